"""``loralab`` entry point: builds the sub-command parser and turns user errors into one line.

Each sub-command lives in its own module in this package and exposes
``register(subparsers) -> None``; the parser it adds carries ``func=run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn

from loralab import __version__
from loralab.errors import LoralabError

# Sub-command modules, in the order ``loralab --help`` lists them.
COMMAND_MODULES = ("plan", "prepare", "cache", "train", "generate", "config_cmd", "lora_cmd", "debug", "sweep", "report", "demo")


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse's parser, with a usage error as one ``error:`` line (like every other loralab
    error) pointing at the command's ``--help`` instead of the whole usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="loralab",
        description="Train, generate with, and compare LoRA adapters for SD1.x and SDXL.",
    )
    parser.add_argument("--version", action="version", version=f"loralab {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"loralab.cli.{name}")
        except ModuleNotFoundError as exc:  # a command whose module is not written yet
            if exc.name == f"loralab.cli.{name}":
                continue
            raise
        module.register(subparsers)
    return parser


def quiet_library_output() -> None:
    """Keep the libraries' own chatter (per-file progress bars, optional-backend notices) off the
    user's terminal; loralab prints its own progress. Users can still raise the levels by setting
    the variables themselves."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def main(argv: list[str] | None = None) -> int:
    quiet_library_output()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except LoralabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `loralab ... | head` closed the pipe: stop quietly, as other command-line tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
