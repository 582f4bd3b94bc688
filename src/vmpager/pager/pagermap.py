"""Moved to ``vmpager.vm.pagermap`` (the VM defines what it asks of pagers); kept for imports."""

from vmpager.vm.pagermap import PagerMap

__all__ = ["PagerMap"]
