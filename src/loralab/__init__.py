"""loralab: train LoRA adapters on SD1.x / SDXL checkpoints and compare training settings."""

__version__ = "0.1.0"
