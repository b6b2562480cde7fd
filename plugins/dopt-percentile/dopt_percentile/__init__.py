"""Percentile activation ranges for dopt (a plugin living outside the dopt distribution)."""
from .observer import PercentileObserver

__all__ = ["PercentileObserver"]
