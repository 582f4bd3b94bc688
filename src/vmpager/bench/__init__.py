"""Benchmarks installed with the package: ``vmpager bench`` and the workload's phases.

- :mod:`vmpager.bench.loop`: fill, access and verify phases of the standard
  paging workload on a VM object (also what ``vmpager run`` runs);
- :mod:`vmpager.bench.paging`: the side-by-side benchmark, vmpager against
  the kernel's swap (``vmpager bench``, ``benchmarks/paging.py``);
- :mod:`vmpager.bench.kernel`: the kernel side (``kworkload.c`` in a memory
  cgroup on a swap file of its own).
"""
