"""Putting zerofuse's kernels into models that were written for torch."""
from .optimize import optimize

__all__ = ["optimize"]
