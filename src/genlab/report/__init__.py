"""Reports over runs: the comparison table and chart (:func:`compare`)."""

from genlab.report.compare import FAMILIES, compare

__all__ = ["FAMILIES", "compare"]
