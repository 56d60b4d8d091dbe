"""What one report has described, so that crafted pointers cannot multiply the work.

A handover is a graph of blobs pointing at each other by physical address, and nothing stops
a crafted one from pointing many times at the same blob: a root with k subtrees that all
point back at the root used to be described k^8 times (8 being the depth bound). So each
report keeps a :class:`Walk`:

* every blob address is described at most once: a second pointer to it is reported as a
  reference to the first (``{"kind": "reference", "same_as": ...}``), and a pointer to a
  blob that is being described -- one that holds the pointer, directly or not -- is ELOOP;
* a :class:`Budget` bounds what the report may cost: blobs described, bytes of FDT parsed,
  and bytes read from RAM (through :meth:`PhysMem.counted`, so memory maps, session arrays
  and folio arrays count too). Past a bound, what is left is an E2BIG error in place.

The bounds are far above any real handover (a dozen blobs plus one per preserved file; the
largest legitimate read is a big memfd's folio array: 16 bytes per folio) and low enough
that the worst crafted input costs seconds.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from liveupdate.abi.physmem import PhysMem
from liveupdate.errors import AbiError

MAX_DEPTH = 8  # root -> LUO -> files -> memfd is 4: deeper is crafted
MAX_BLOBS = 4096  # blobs described (FDTs, raw blobs, memfd structs)
MAX_FDT_BYTES = 32 << 20  # bytes of FDT parsed: the costly kind (a few MB/s of tiny nodes)
MAX_READ = 512 << 20  # bytes read from RAM (a 32 GiB memfd of 4 KiB folios has a 128 MiB array)

Report = dict[str, Any]


@dataclass
class Budget:
    """What one report (or one RAM scan's candidates, together) has spent."""

    blobs: int = 0
    fdt_bytes: int = 0
    read: int = 0

    def spend(self, what: str, phys: int, *, blobs: int = 0, fdt_bytes: int = 0,
              read: int = 0) -> None:
        for spent, more, limit, unit in ((self.blobs, blobs, MAX_BLOBS, "blobs described"),
                                         (self.fdt_bytes, fdt_bytes, MAX_FDT_BYTES,
                                          "bytes of FDT parsed"),
                                         (self.read, read, MAX_READ, "bytes read from RAM")):
            if more and spent + more > limit:
                raise AbiError(msg=f"{what} at {phys:#x}: not followed: this report is at its "
                               f"bound of {limit} {unit} (a handover this large or this "
                               "repetitive is crafted)", err=errno.E2BIG)
        self.blobs += blobs
        self.fdt_bytes += fdt_bytes
        self.read += read

    def read_hook(self, phys: int, size: int, what: str) -> None:
        self.spend(what, phys, read=size)


@dataclass
class Walk:
    budget: Budget
    seen: dict[int, str] = field(default_factory=dict)  # blob address -> what it was
    path: dict[int, str] = field(default_factory=dict)  # blobs being described now


_WALK: ContextVar[Walk | None] = ContextVar("report_walk", default=None)
_BUDGET: ContextVar[Budget | None] = ContextVar("report_budget", default=None)


@contextmanager
def shared_budget() -> Iterator[Budget]:
    """One budget for every report made inside (a RAM scan describes several roots)."""
    budget = _BUDGET.get()
    if budget is not None:
        yield budget
        return
    budget = Budget()
    token = _BUDGET.set(budget)
    try:
        yield budget
    finally:
        _BUDGET.reset(token)


@contextmanager
def walk(mem: PhysMem | None) -> Iterator[PhysMem | None]:
    """Join the report being made (a describer called by another), or begin one; yields
    ``mem`` with its reads counted against the report's budget."""
    current = _WALK.get()
    if current is not None:
        yield mem
        return
    w = Walk(_BUDGET.get() or Budget())
    token = _WALK.set(w)
    try:
        yield None if mem is None else mem.counted(w.budget.read_hook)
    finally:
        _WALK.reset(token)


def once(phys: int, what: str, describe: Callable[[], Report]) -> Report:
    """``describe()`` the blob at ``phys`` unless this report already has: a reference to
    the first description, or ELOOP when the blob is one being described."""
    w = _WALK.get()
    if w is None:
        raise AssertionError("report_walk.once outside a walk")  # a bug, not input
    if phys in w.path:
        raise AbiError(msg=f"{what} at {phys:#x} points back at {w.path[phys]}, which holds "
                       "it (a pointer loop)", err=errno.ELOOP)
    if phys in w.seen:
        return {"kind": "reference", "phys": f"{phys:#x}", "same_as": w.seen[phys],
                "note": "described once, where it was first pointed at"}
    if len(w.path) >= MAX_DEPTH:
        raise AbiError(msg=f"{what} at {phys:#x}: pointers nest deeper than {MAX_DEPTH} "
                       "blobs", err=errno.ELOOP)
    w.budget.spend(what, phys, blobs=1)
    w.seen[phys] = w.path[phys] = what
    try:
        return describe()
    finally:
        del w.path[phys]


def spend_fdt(what: str, phys: int, nbytes: int) -> None:
    """Charge an FDT about to be parsed to the report being made."""
    w = _WALK.get()
    if w is not None:
        w.budget.spend(what, phys, fdt_bytes=nbytes)
