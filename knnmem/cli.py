"""The `knnmem` command line: thin wrappers over library functions, one subcommand each."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing


class UsageError(Exception):
    """A problem with the command's input, reported as one line without a traceback."""


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parse_int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _add_dataclass_options(parser: argparse.ArgumentParser, cls) -> None:
    """One `--field-name` option per field of the dataclass `cls`, typed from its annotations."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        kind = {bool: _parse_bool, int: int, float: float, str: str}.get(hint)
        if kind is None:
            kind = _parse_int_list if "list" in str(hint) else str
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=default,
                            help=f"(default: {default})")


def cmd_train(args) -> None:
    from .train import TrainConfig, train

    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    try:
        config = TrainConfig(**fields)
    except ValueError as e:
        raise UsageError(str(e)) from None
    train(config, args.out)


def build_parser() -> argparse.ArgumentParser:
    from .train import TrainConfig

    parser = argparse.ArgumentParser(prog="knnmem", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a LongLLaMA model with FoT cross-batch attention (resumable)")
    p.add_argument("--out", required=True, help="run directory: tokenizer, checkpoint, metrics, loss plot")
    _add_dataclass_options(p, TrainConfig)
    p.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (UsageError, FileNotFoundError) as e:
        print(f"knnmem {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
