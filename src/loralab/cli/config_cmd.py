"""``loralab config``: convert kohya_ss / sd-scripts configs to native TOML, show a resolved config.

- ``loralab config convert IN OUT.toml [--set k=v ...] [--force]`` reads a kohya_ss GUI JSON,
  sd-scripts TOML or loralab TOML and writes the native TOML (atomically; an existing OUT
  is kept unless ``--force``).
- ``loralab config show CONFIG [--set k=v ...]`` prints the resolved native TOML: every
  setting after import, defaults and overrides.

Both list the keys ignored on purpose on stderr. Bad input is one ``error:`` line, exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from loralab.cli.options import add_force_option, add_override_option, check_output_file
from loralab.errors import ConfigError

if TYPE_CHECKING:
    from loralab.config.diagnostics import IgnoredKey



def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "config",
        help="convert kohya_ss / sd-scripts configs to loralab TOML, or show a resolved config",
        description="Work with training configs (loralab TOML, sd-scripts TOML, kohya_ss GUI JSON).",
    )
    actions = parser.add_subparsers(dest="config_command", metavar="ACTION")

    convert = actions.add_parser(
        "convert",
        help="write a config as native loralab TOML",
        description="Read a kohya_ss GUI JSON, sd-scripts TOML or loralab TOML config and write native TOML.",
    )
    convert.add_argument("source", type=Path, metavar="IN", help="config to read (.json or .toml)")
    convert.add_argument("target", type=Path, metavar="OUT.toml", help="native TOML file to write")
    add_override_option(convert)
    add_force_option(convert)

    show = actions.add_parser(
        "show",
        help="print the resolved native TOML of a config",
        description="Print every setting of a config after import, defaults and --set overrides.",
    )
    show.add_argument("config", type=Path, help="config to read (.json or .toml)")
    add_override_option(show)

    parser.set_defaults(func=run, config_parser=parser)


def run(args: argparse.Namespace) -> int:
    if args.config_command == "convert":
        return _convert(args)
    if args.config_command == "show":
        return _show(args)
    args.config_parser.print_help(sys.stderr)
    return 2


def _convert(args: argparse.Namespace) -> int:
    from loralab.config.loading import read_config, save_config

    target: Path = args.target
    # Checked before the source is read and its notes are printed.
    check_output_file(target, [args.source], force=args.force, suffix=".toml")
    loaded = read_config(args.source, args.overrides)
    _report_ignored(loaded.ignored)
    try:
        save_config(loaded.config, target)
    except OSError as exc:
        raise ConfigError(f"cannot write {target} ({exc.strerror}); choose another output path") from None
    print(f"wrote {target} (from {loaded.source_format} config {args.source})")
    return 0


def _show(args: argparse.Namespace) -> int:
    from loralab.config.loading import config_to_toml, read_config

    loaded = read_config(args.config, args.overrides)
    _report_ignored(loaded.ignored)
    sys.stdout.write(config_to_toml(loaded.config))
    return 0


def _report_ignored(ignored: tuple[IgnoredKey, ...]) -> None:
    # One line per reason: a GUI config has a dozen ignored keys, several for the same reason.
    by_reason: dict[str, list[str]] = {}
    for item in ignored:
        by_reason.setdefault(item.reason, []).append(item.key)
    for reason, keys in by_reason.items():
        print(f"note: ignored {', '.join(keys)}: {reason}", file=sys.stderr)
