"""Moved to ``vmpager.vm.put`` (the VM defines what it asks of pagers); kept for imports."""

from vmpager.vm.put import pager_put

__all__ = ["pager_put"]
