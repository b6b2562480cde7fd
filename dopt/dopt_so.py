"""``python -m dopt.dopt_so``, the reference's name; the program is ``dopt.cli.dopt_so``."""
import sys

from .cli.dopt_so import main

if __name__ == "__main__":
    sys.exit(main())
