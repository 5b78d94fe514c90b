"""Train with DeepSpeed in this process (one rank, or one of many when started by a launcher).
Same as `python train.py`; see `python train.py --help` for the options."""

from __future__ import annotations

NAME = "train"
HELP = "train a model (same as train.py)"


def add_arguments(p) -> None:
    p.add_argument("rest", nargs="*", help="arguments of train.py (--config, --ds_config, --set)")


def run_argv(argv: list[str]) -> int:
    from astrai_ds.training.run import main_and_exit

    main_and_exit(argv, prog="astrai-ds train")


def run(args) -> int:
    return run_argv(args.rest)
