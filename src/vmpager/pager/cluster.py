"""Moved to ``vmpager.vm.cluster`` (the VM defines what it asks of pagers); kept for imports."""

from vmpager.vm.cluster import make_put_cluster

__all__ = ["make_put_cluster"]
