"""`astrai-ds` / `python -m astrai_ds`: one subcommand per step of the pipeline.

    corpus -> tokenizer -> prepare -> train -> export -> eval
"""

from __future__ import annotations

import argparse
import sys

from astrai_ds.cli import corpus, evaluate, export, prepare, report, tokenizer, train
from astrai_ds.errors import UserError

COMMANDS = {m.NAME: m for m in (corpus, tokenizer, prepare, train, export, evaluate, report)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="astrai-ds",
        description="Train bilingual decoder-only language models with DeepSpeed. The pipeline: "
                    "corpus -> tokenizer -> prepare -> train -> export -> eval. "
                    "Run `astrai-ds COMMAND --help` for each step.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS.items():
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:  # train.py owns its arguments (and the launcher's --local_rank)
        return train.run_argv(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command].run(args) or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
