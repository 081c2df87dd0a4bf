"""The ``catdog`` command: ``catdog predict PATH...``, ``catdog explain {activations,filters}``,
``catdog spark-predict SOURCE OUTPUT``, ``catdog tune --space FILE``, ``catdog sync``, ``catdog --version``.

The top layer: ``arguments`` builds the parser (each subcommand's options and their checks), ``commands``
runs each subcommand; it may import every layer below, the heavy ones (search, serving, explain, tracking,
models) inside the command that needs them, so ``catdog --help`` starts fast. A ``CatdogError`` ends as one
line on stderr and exit code 2.
"""

from __future__ import annotations

import sys

from catdog.cli import commands
from catdog.cli.arguments import build_parser
from catdog.core.errors import CatdogError

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "tune" and args.trials is None and args.timeout is None:
        parser.error("tune needs a budget: --trials N and/or --timeout MINUTES")
    try:
        return commands.BY_NAME[args.command](args)
    except CatdogError as exc:
        print(f"catdog: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # spark-submit runs this file (docs/operations.md)
    sys.exit(main())
