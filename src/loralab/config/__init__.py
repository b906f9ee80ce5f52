"""Training configuration: the typed schema, native TOML, and kohya_ss / sd-scripts import.

Entry points: ``load_config(path, overrides)`` -> ``TrainConfig``; ``read_config`` (also
returns the source format and the keys ignored on purpose); ``apply_overrides``;
``save_config``. See docs/config.md.
"""

from loralab.config.diagnostics import IgnoredKey
from loralab.config.loading import LoadedConfig, apply_overrides, load_config, read_config, save_config
from loralab.config.schema import TrainConfig

__all__ = [
    "IgnoredKey",
    "LoadedConfig",
    "TrainConfig",
    "apply_overrides",
    "load_config",
    "read_config",
    "save_config",
]
