"""``loralab prepare``: turn a folder of photos into a kohya-layout training set.

Entry point: :func:`prepare_dataset` with :class:`PrepareOptions`; see ``runner`` for the steps.
"""

from loralab.data.prepare.report import FileRow, PrepareReport
from loralab.data.prepare.runner import PrepareError, PrepareOptions, prepare_dataset

__all__ = ["FileRow", "PrepareError", "PrepareOptions", "PrepareReport", "prepare_dataset"]
