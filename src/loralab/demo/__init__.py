"""``loralab demo``: the whole workflow on the bundled toy world, in minutes on a laptop CPU.

Photos of the toy subject are rendered, prepared into a kohya dataset, class images of plain
"ring"s are drawn by the base checkpoint (prior preservation, so the subject stays with its
trigger word), a LoRA is trained from a baseline modelled on the guide's settings, a small sweep
compares variants, every save point is rendered on both toy checkpoints with and without the
trigger, scored with the toy likeness scorer, and the report is written. Entry point: :func:`run_demo`.
"""

from loralab.demo.runner import DemoResult, run_demo

__all__ = ["DemoResult", "run_demo"]
