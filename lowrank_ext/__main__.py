"""`python -m lowrank_ext finetune|bench|doctor|memory ...` (see lowrank_ext/finetune/cli.py).

A --help anywhere is answered from the torch-free parser (finetune/cli_args.py) without importing torch: the
package's __init__ skipped its imports for it (lowrank_ext._HELP_ONLY)."""

import sys


def _run() -> int:
    import lowrank_ext

    if lowrank_ext._HELP_ONLY:
        from lowrank_ext.finetune.cli_args import build_parser

        build_parser().parse_args(sys.argv[1:])  # prints the help (or an argument error) and exits
    from lowrank_ext.finetune.cli import main

    return main()


if __name__ == "__main__":
    sys.exit(_run())
