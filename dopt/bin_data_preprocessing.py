"""``python -m dopt.bin_data_preprocessing``, the reference's name.

The program is ``dopt.cli.bin_data_preprocessing``."""
import sys

from .cli.bin_data_preprocessing import main

if __name__ == "__main__":
    sys.exit(main())
