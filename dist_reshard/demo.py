"""`python -m dist_reshard.demo`: the command line of `tools/demo.py`."""

import sys

from .tools.demo import main

if __name__ == "__main__":
    sys.exit(main())
