"""LoRA networks in the kohya format: targets, modules, files, applying and merging.

``targets`` finds the layers a LoRA adapts and names them as kohya does (``kohya_names`` is the one
place names are converted); ``lora`` holds the LoRA module and ``LoRANetwork``; ``lora_file`` reads
and writes LoRA files with sd-scripts' metadata; ``merge`` applies LoRAs to loaded models, merges
them into the weights and saves merged checkpoints.
"""
