"""``python -m ftcluster {train,merge,estimate} ...``"""

from __future__ import annotations

import sys

COMMANDS = {"train": "ftcluster.train", "merge": "ftcluster.merge", "estimate": "ftcluster.estimate"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m ftcluster {{{','.join(COMMANDS)}}} [args]", file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
