"""`python -m lowrank_ext finetune|bench ...` (see lowrank_ext/cli.py)."""

import sys

from lowrank_ext.cli import main

if __name__ == "__main__":
    sys.exit(main())
