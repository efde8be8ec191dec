"""The kernel contract (DESIGN.md §4): a torch reference beside each backend, and the dispatcher."""

from . import reference
from .dispatch import Backend, available, backends, resolve

__all__ = ["Backend", "available", "backends", "reference", "resolve"]
