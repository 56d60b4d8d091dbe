"""The root FDT as a strategy, one per KHO core (chosen once, from the image's core:
:mod:`liveupdate.kernel.kho.core`). Everything that differs in how the root and its subtrees
come to be -- when components preserve, who may add a subtree, what finalize and abort do,
what debugfs shows -- is a method here; the rest of the kernel never asks which core it runs.

* :class:`SequentialRoot` (6.16/6.18 notifier cores): the root page is allocated at boot but
  written and preserved only by ``kho_finalize``, which runs the ``KEXEC_KHO_FINALIZE``
  notifiers components registered (:meth:`publish`, ``register_kho_notifier``) and builds the
  root sequentially, children in registration order; while finalized every preserve is EBUSY
  (6.16 ``kho_preserve_folio``); ``kho_abort`` throws the whole tracker away. One deviation:
  Linux leaves the stale tree in the (now unpreserved) root page after an abort; we zero it,
  so a ``kho_sanitize=off`` kexec cannot revive chunks that were freed.
* :class:`LiveRoot` (6.19/7.0): the root is built at boot in a preserved page and edited live
  as subtrees come and go; finalize serializes the kho-v1 map
  (:mod:`liveupdate.kernel.kho.serialize`) into freshly allocated, *not* preserved, pages.
* :class:`StatelessRoot` (7.1/7.2, kho-v3/kho-v4): a live root over the radix tree in RAM
  (:mod:`liveupdate.kernel.kho.radix`); children carry ``preserved-data`` and ``blob-size``,
  and "finalize" only closes the tracker -- unless negotiation lowered ``out_format``: kho-v1
  (the root rebuilt as kho-v1 with the same children, in the same order of addition, and the
  map serialized) or kho-v3 from a kho-v4 kernel (the same tree, the other root string).
"""

from __future__ import annotations

import errno
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING

from liveupdate.abi import generations
from liveupdate.abi import kho as kho_abi
from liveupdate.abi.consts import PAGE_SIZE
from liveupdate.errors import AbiError, LiveUpdateError
from liveupdate.kernel.kho.radix import RadixLive

if TYPE_CHECKING:
    from liveupdate.kernel.kho.outgoing import KhoOut

Notifier = Callable[["KhoOut"], None]
RAW_SUBTREES = frozenset({"kexec-metadata"})  # KHO's own raw blobs (kho-v3+)


class Root(ABC):
    """What every root strategy does; the defaults are the live cores' (6.19+), the
    abstract methods each strategy's own."""

    radix: RadixLive | None = None

    def __init__(self, kout: KhoOut) -> None:
        self.kout = kout

    @abstractmethod
    def start(self) -> int:
        """kho_init: the root page (returned)."""

    def check_open(self) -> None:  # noqa: B027 - a hook: live cores accept every preserve
        """Called before every preserve: live cores always take more."""

    @property
    def in_finalize(self) -> bool:
        """Inside ``kho_finalize``'s notifiers, whose failure must fail the finalize."""
        return False

    def publish(self, notifier: Notifier) -> None:
        """A component's "preserve, then add my subtree" step: live cores run it now."""
        notifier(self.kout)

    @abstractmethod
    def add_subtree(self, name: str, phys: int, size: int) -> None:
        ...

    @abstractmethod
    def remove_subtree(self, phys: int) -> None:
        ...

    @abstractmethod
    def subtrees(self) -> tuple[tuple[str, int], ...]:
        ...

    @abstractmethod
    def blob(self) -> bytes:
        """The root FDT as the next kernel would read it."""

    def valid(self) -> bool:
        """Whether the root page holds an FDT now (status' ``root_fdt_valid``)."""
        return True

    @abstractmethod
    def debugfs_fdt(self, kho_boot: bool) -> bytes | None:
        """debugfs ``out/fdt``, or None where it does not exist."""

    @abstractmethod
    def finalize(self, freeze: bool) -> int:
        ...

    def abort(self) -> None:
        raise LiveUpdateError(err=errno.EINVAL, msg="KHO: no abort on this core")


class SequentialRoot(Root):
    """6.16/6.18: the root is built by ``kho_finalize``, from its notifiers."""

    def __init__(self, kout: KhoOut) -> None:
        super().__init__(kout)
        self.registered: list[Notifier] = []  # register_kho_notifier, in order
        self.sequential: list[tuple[str, int]] | None = None  # in finalize: being added
        self.added: list[tuple[str, int]] = []  # this finalize's subtrees

    def start(self) -> int:
        """kho_init: alloc_page; written and preserved at finalize."""
        phys = self.kout.mm.alloc_pages(0)
        self.kout.mm.zero(phys, PAGE_SIZE)
        return phys

    def check_open(self) -> None:
        """6.16 ``kho_preserve_folio``/``_phys``: EBUSY once finalized."""
        if self.kout.finalized:
            raise LiveUpdateError(err=errno.EBUSY, msg="KHO: finalized; abort first "
                                  "(echo 0 > kho/out/finalize)")

    @property
    def in_finalize(self) -> bool:
        return self.sequential is not None

    def publish(self, notifier: Notifier) -> None:
        """``register_kho_notifier``: run at every finalize -- after an abort threw its
        preservations away, it preserves them again."""
        self.registered.append(notifier)

    def add_subtree(self, name: str, phys: int, size: int) -> None:
        if self.sequential is None:
            raise LiveUpdateError(err=errno.EINVAL, msg=f"kho_add_subtree({name}): only a "
                                  "KEXEC_KHO_FINALIZE notifier may add subtrees on this core")
        if any(n == name for n, _ in self.sequential):
            raise LiveUpdateError(err=errno.EEXIST, msg=f"kho_add_subtree({name}): exists")
        self.sequential.append((name, phys))

    def remove_subtree(self, phys: int) -> None:
        """Nothing to edit: the next finalize builds the root afresh."""

    def subtrees(self) -> tuple[tuple[str, int], ...]:
        return tuple(self.added)

    def blob(self) -> bytes:
        """Empty before a finalize: the page is no FDT."""
        kout = self.kout
        return kout.mm.mem.read_fdt(kout.root_phys, "KHO root FDT") if kout.finalized else b""

    def valid(self) -> bool:
        return self.kout.finalized

    def debugfs_fdt(self, kho_boot: bool) -> bytes | None:
        return self.blob() if self.kout.finalized else None

    def finalize(self, freeze: bool) -> int:
        """The whole ``kho_finalize``: preserve the root page, run the notifiers, serialize,
        write the root sequentially; any failure aborts (``kho_abort``) and is returned.
        Always freezes: finalized, nothing is unpreserved."""
        kout = self.kout
        if kout.finalized:
            raise LiveUpdateError(err=errno.EEXIST, msg="KHO: already finalized")
        self.sequential = []
        try:
            kout.preserve_folio(kout.root_phys, 0)
            for notifier in self.registered:
                notifier(kout)
            self.added = self.sequential
            self.sequential = None
            mem_map = kout.close(kout.write_map(kout.out_format), True)
            kout.mm.write(kout.root_phys, kho_abi.encode_root_sequential(mem_map, self.added)
                          .ljust(PAGE_SIZE, b"\0"))
        except LiveUpdateError:
            self.sequential = None
            self.abort()
            raise
        return mem_map

    def abort(self) -> None:
        """kho_abort: the tracker, the serialized map and every subtree are thrown away;
        components preserve again at the next finalize."""
        self.added = []
        self.kout.reset()


class LiveRoot(Root):
    """6.19/7.0: the root FDT lives from ``kho_init`` on; finalize writes the kho-v1 map."""

    def __init__(self, kout: KhoOut) -> None:
        super().__init__(kout)
        self.added: list[tuple[str, int, int]] = []  # (name, phys, size), in order

    def start(self) -> int:
        phys = self.kout.alloc_preserve(PAGE_SIZE)
        self.kout.mm.write(phys, self.kout.root.blob.ljust(PAGE_SIZE, b"\0"))
        return phys

    def flush(self) -> None:
        kout = self.kout
        kout.mm.write(kout.root_phys, kout.root.blob.ljust(PAGE_SIZE, b"\0"))

    def add_subtree(self, name: str, phys: int, size: int) -> None:
        try:
            self.kout.root.add_subtree(name, phys, size)
        except AbiError as e:
            raise LiveUpdateError(err=e.errno, msg=f"kho_add_subtree({name}): {e.message}") from e
        self.added.append((name, phys, size))
        self.flush()

    def remove_subtree(self, phys: int) -> None:
        if self.kout.root.remove_subtree(phys):
            self.added = [a for a in self.added if a[1] != phys]
            self.flush()

    def subtrees(self) -> tuple[tuple[str, int], ...]:
        return kho_abi.decode_root(self.kout.root.blob).subtrees

    def blob(self) -> bytes:
        return self.kout.root.blob

    def debugfs_fdt(self, kho_boot: bool) -> bytes | None:
        """Cold boots only, cut to the length it had at ``kho_init``."""
        return None if kho_boot else self.blob()[: self.kout.fdt_debugfs_size]

    def finalize(self, freeze: bool) -> int:
        """Serialize the memory map (again) and point the root at it."""
        kout = self.kout
        mem_map = kout.write_map(kout.out_format)
        kout.root.set_mem_map(mem_map)
        self.flush()
        return kout.close(mem_map, freeze)


class StatelessRoot(LiveRoot):
    """7.1/7.2: the radix tree is the map; finalize closes the tracker (or, negotiated,
    writes the older format)."""

    def __init__(self, kout: KhoOut) -> None:
        super().__init__(kout)
        self.radix = RadixLive(kout.mm)

    def _reroot(self, fmt: str, mem_map: int) -> None:
        """The root in another format, same children added in the same order (negotiated
        handovers; the root page is the same)."""
        root = kho_abi.LiveRoot(generations.KHO_COMPATIBLE[fmt], mem_map)
        for name, phys, size in self.added:
            if name in RAW_SUBTREES and not kho_abi.is_radix(root.compatible):
                continue  # a raw blob has no place under a kho-v1 root (``fdt``)
            root.add_subtree(name, phys, size)
        self.kout.root = root
        self.flush()

    def finalize(self, freeze: bool) -> int:
        kout, out = self.kout, self.kout.out_format
        assert self.radix is not None
        kout.free_map()
        stateless = kho_abi.is_radix(out)  # the tree is the map; else a kho-v1 map for it
        if generations.KHO_COMPATIBLE[out] != kout.root.compatible:
            self._reroot(out, self.radix.root if stateless else 0)
        if stateless:
            return kout.close(self.radix.root, freeze)
        return super().finalize(freeze)
