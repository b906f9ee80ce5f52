"""Command-line options that several sub-commands share, defined once so they read the same."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """The positional CONFIG of commands that take a training config."""
    parser.add_argument("config", type=Path, help="config file: loralab TOML, sd-scripts TOML or kohya_ss GUI JSON")


def add_override_option(parser: argparse.ArgumentParser) -> None:
    """``--set KEY=VALUE`` (repeatable), collected into ``args.overrides``."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (same names and checks as the file, e.g. optimizer_args.growth_rate=1.06); "
        "repeatable",
    )
