"""Errors that reach the user as one clear line.

Every problem caused by the user's input (a file, a config, a dataset) is raised as a
``LoralabError`` subclass whose message says what is wrong and what to do. The CLI prints
``error: <message>`` and exits non-zero; anything else is a bug and keeps its traceback.
"""


class LoralabError(Exception):
    """Base class for errors reported to the user without a traceback."""


class ConfigError(LoralabError):
    """A configuration file, key, value or override is invalid."""


class CheckpointError(LoralabError):
    """A checkpoint (or VAE / tokenizer) cannot be loaded or is of the wrong kind."""


class DatasetError(LoralabError):
    """A dataset folder is missing, empty or laid out in a way we cannot train on."""


class LoraFileError(LoralabError):
    """A LoRA file cannot be read, written or applied."""
