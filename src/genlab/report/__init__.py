"""Reports over runs: the comparison table and chart (:func:`compare`) and the HTML run report (:func:`write_report`)."""

from genlab.report.compare import FAMILIES, compare
from genlab.report.html import write_report

__all__ = ["FAMILIES", "compare", "write_report"]
