"""ACIQ analytical clipping for dopt (a plugin living outside the dopt distribution)."""
from .observer import ACIQObserver, optimal_clip

__all__ = ["ACIQObserver", "optimal_clip"]
