"""Kexec HandOver in the emulated kernel (kernel/liveupdate/kexec_handover.c), one concept per
module:

* :mod:`.core` -- the KHO cores of 6.16, 6.18, 6.19 and 7.1 as a table of :class:`KhoCore`
  objects, chosen once from the image; every behaviour that differs between them is a method
  there or in its root strategy, so nobody else asks which core runs.
* :mod:`.tracker` -- the preserved-page tracker (per-order numpy bitmaps, Linux's layout).
* :mod:`.radix` -- the kho-v3/kho-v4 radix tree kept live in RAM (7.1+).
* :mod:`.roots` -- the root FDT as a strategy: sequential at finalize from notifiers
  (6.16/6.18), live (6.19/7.0), stateless over the radix tree (7.1/7.2).
* :mod:`.serialize` -- the kho-v1 memory map written at finalize.
* :mod:`.outgoing` -- :class:`KhoOut`: preserve/unpreserve, preserved allocations and vmalloc
  areas, subtrees, finalize.
* :mod:`.validate` -- the incoming handover checked whole before use.
* :mod:`.incoming` -- :class:`KhoIn`: retrieve and restore, the symmetric pairs of preserve.
* :mod:`.mmops` -- what KHO needs from the rest of the kernel.
"""
