"""Moved to ``vmpager.vm.pagerops`` (the VM defines what it asks of pagers); kept for imports."""

from vmpager.vm.pagerops import Pager, PagerResult

__all__ = ["Pager", "PagerResult"]
