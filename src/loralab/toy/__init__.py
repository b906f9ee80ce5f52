"""The toy world and its bundled base models, so loralab's whole workflow runs on a laptop CPU.

- ``world``: small images of shapes on simple backgrounds with plain-English captions, and the
  toy subject ("blh ring") that LoRAs learn.
- ``likeness``: a fixed 0-1 score of how much an image shows the subject.
- ``model``: the toy model's sizes (SD1.5 architecture, tiny) and the paths of the two shipped
  checkpoints (``toy_base``, ``toy_alt``), made by ``scripts/pretrain_toy.py``.

Submodules are imported on use; this package imports nothing heavy by itself.
"""
