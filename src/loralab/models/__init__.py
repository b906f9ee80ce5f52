"""Checkpoint loading (single-file and diffusers), family detection, the CLIP tokenizer, and
tiny random models for tests.

Submodules are imported on use; this package imports nothing heavy by itself, so
``import loralab.models.family`` stays cheap.
"""
