"""``python -m ftcluster {train,plan,estimate,merge} ...``"""

from __future__ import annotations

import sys

COMMANDS = {
    "train": ("ftcluster.train", "main", "fine-tune a model: --config RECIPE [key=value ...]"),
    "plan": ("ftcluster.cli", "plan_main", "print every decision a run would make, with its reason"),
    "estimate": ("ftcluster.cli", "estimate_main", "estimate a run's memory per GPU, term by term"),
    "merge": ("ftcluster.merge", "main", "fold a trained LoRA/QLoRA adapter into its base model"),
}


def usage() -> str:
    lines = ["usage: python -m ftcluster COMMAND [args]   (COMMAND --help for its own)", "", "commands:"]
    lines += [f"  {name:<9} {what}" for name, (_, _, what) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(usage(), file=sys.stderr)
        return 2
    import importlib

    module, function, _ = COMMANDS[argv[0]]
    return getattr(importlib.import_module(module), function)(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
