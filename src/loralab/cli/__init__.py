"""The ``loralab`` command line."""
