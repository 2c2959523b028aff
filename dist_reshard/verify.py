"""`python -m dist_reshard.verify`: the command line of `tools/verify.py`."""

import sys

from .tools.verify import main

if __name__ == "__main__":
    sys.exit(main())
