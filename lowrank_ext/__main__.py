"""`python -m lowrank_ext finetune|bench|doctor ...` (see lowrank_ext/finetune/cli.py)."""

import sys

from lowrank_ext.finetune.cli import main

if __name__ == "__main__":
    sys.exit(main())
