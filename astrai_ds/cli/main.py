"""`astrai-ds` / `python -m astrai_ds`: one subcommand per step of the pipeline.

    corpus -> tokenizer -> prepare -> train -> export -> eval, generate, chat, serve, rag
    (or start from a pretrained model: a Hugging Face folder as it is, a GGUF file through `import`)
"""

from __future__ import annotations

import argparse
import sys

from astrai_ds.cli import (chat, corpus, evaluate, export, generate, import_model, plan, prepare, rag, report, serve,
                           tokenizer, train)
from astrai_ds.errors import UserError
from astrai_ds.extensions import use_extensions_cache

COMMANDS = {m.NAME: m for m in (corpus, tokenizer, prepare, train, export, import_model, evaluate, generate, chat,
                                 serve, rag, report, plan)}


class HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help, unless there is no default to show (None, a flag's False)
    or the help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS or "default" in text):
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="astrai-ds",
        description="Train bilingual decoder-only language models with DeepSpeed. The pipeline: "
                    "corpus -> tokenizer -> prepare -> train -> export -> eval, generate, chat, serve, rag. "
                    "A pretrained model works too: a Hugging Face folder as it is, a GGUF file through `import`. "
                    "Run `astrai-ds COMMAND --help` for each step.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS.items():
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__,
                           formatter_class=HelpFormatter)
        module.add_arguments(p)
    return parser


def _drop_local_rank(argv: list[str]) -> list[str]:
    """The `deepspeed` launcher (`deepspeed --module astrai_ds generate ...`) puts `--local_rank=R` before the
    subcommand; the rank is in the environment (LOCAL_RANK) as well, so it is dropped here."""
    while argv and (argv[0].startswith(("--local_rank=", "--local-rank=")) or argv[0] in ("--local_rank", "--local-rank")):
        argv = argv[1:] if "=" in argv[0] else argv[2:]
    return argv


def main(argv: list[str] | None = None) -> int:
    argv = _drop_local_rank(sys.argv[1:] if argv is None else argv)
    use_extensions_cache()  # DeepSpeed's compiled ops: built once per machine, whatever the checkout
    if argv[:1] == ["train"]:  # train.py owns its arguments (and the launcher's --local_rank)
        return train.run_argv(argv[1:])
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command].run(args) or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
