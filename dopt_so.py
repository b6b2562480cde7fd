#!/usr/bin/env python3
"""The reference tool's script entry point: ``python3 ./dopt_so.py --framework 5 --mode 0 ...``.

Same program as the ``dopt_so`` command and ``python -m dopt.dopt_so``.
"""
import sys

from dopt.cli.dopt_so import main

if __name__ == "__main__":
    sys.exit(main())
