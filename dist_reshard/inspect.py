"""`python -m dist_reshard.inspect`: the command line of `tools/inspect.py`."""

import sys

from .tools.inspect import main

if __name__ == "__main__":
    sys.exit(main())
