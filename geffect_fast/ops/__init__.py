"""The kernel contract (docs/design.md §4): a torch reference beside each backend, and the dispatcher."""

from . import contract, reference
from .dispatch import AUTO, Backend, available, backends, resolve

__all__ = ["AUTO", "Backend", "available", "backends", "contract", "reference", "resolve"]
