import sys

from .opt_main import main

sys.exit(main())
