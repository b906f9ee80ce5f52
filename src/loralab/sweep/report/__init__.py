"""The sweep report: a self-contained HTML folder (summary page + one page per comparison, PNG
plots and grids in ``assets/``), and ``results.json`` / ``results.csv`` with the scores.

``write_report(sweep_dir)`` reads the sweep folder as it is (finished, failed and unfinished
runs alike) and can be called at any time; ``loralab report SWEEP_DIR`` calls it.
"""

from loralab.sweep.report.writer import ReportError, write_report

__all__ = ["ReportError", "write_report"]
