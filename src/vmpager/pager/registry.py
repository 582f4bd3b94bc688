"""Moved to ``vmpager.vm.registry`` (the VM defines what it asks of pagers); kept for imports."""

from vmpager.vm.registry import PagerRegistry, get_pages, put_pages

__all__ = ["PagerRegistry", "get_pages", "put_pages"]
