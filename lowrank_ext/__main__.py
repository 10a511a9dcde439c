"""`python -m lowrank_ext finetune|bench|doctor|memory ...` (see lowrank_ext/finetune/cli.py).

A --help anywhere is answered from the torch-free parser (finetune/cli_args.py) without importing torch: the
package's __init__ skipped its imports for it (the same test, cli_args.wants_help)."""

import sys

from lowrank_ext.finetune.cli_args import build_parser, wants_help


def _run() -> int:
    if wants_help(sys.argv[1:]):
        build_parser().parse_args(sys.argv[1:])  # prints the help (or an argument error) and exits
    from lowrank_ext.finetune.cli import main

    return main()


if __name__ == "__main__":
    sys.exit(_run())
