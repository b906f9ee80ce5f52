"""Sweeps: many runs from one baseline config, evaluated the same way, compared in one report.

Pipeline, one module each:

- :mod:`~loralab.sweep.spec`: the sweep file (baseline, axes, mode, evaluation, scoring);
- :mod:`~loralab.sweep.expand`: runs with readable names and validated configs (``expanded.json``);
- :mod:`~loralab.sweep.overview`: the plan printed before a sweep starts (steps, time);
- :mod:`~loralab.sweep.execution`: train one run (skip, resume or restart; failures recorded);
- :mod:`~loralab.sweep.model_pool`: base models shared by the runs of one process;
- :mod:`~loralab.sweep.evaluate`: render every save point on the evaluation checkpoints;
- :mod:`~loralab.sweep.local_backend`, :mod:`~loralab.sweep.ray_backend`: where runs execute;
- :mod:`~loralab.sweep.runner`: the whole sweep (``loralab sweep``);
- :mod:`~loralab.sweep.results`: ``results.json`` / ``results.csv``;
- :mod:`~loralab.sweep.layout`: the sweep folder on disk;
- :mod:`~loralab.sweep.scoring`, :mod:`~loralab.sweep.report`: scores and the HTML report.

Submodules are imported on use; this package imports nothing heavy.
"""
