"""The one file-handler interface of LUO (``include/linux/liveupdate.h``,
``struct liveupdate_file_ops`` and ``struct liveupdate_file_op_args``), and the list handlers
register into (``liveupdate_register_file_handler`` in ``luo_file.c``).

The operations come in symmetric pairs, as upstream's: ``preserve``/``unpreserve`` (the heavy
work -- pin, fill holes, freeze the size, preserve memory, serialize -- and its undo),
``freeze``/``unfreeze`` (the last update inside ``reboot()`` and its rollback),
``retrieve``/``finish`` (the next kernel builds a file from the serialized data; finish
releases what was preserved, freeing it when the file was never retrieved).

Each operation gets one :class:`Args` -- the file, its serialized data (one u64 in every
generation), and the format this handover writes for the handler's component (the plan's:
negotiation may pick an older one) -- never the LUO core or the session. ``preserve`` is v3's
``prepare`` (run at SET_EVENT(PREPARE)) and mainline's ``preserve`` (run at PRESERVE_FD);
``unpreserve`` is v3's ``cancel``.

Handlers register by the component format they read and write (``memfd-v2``; the format
table, :mod:`liveupdate.abi.formats`, names each and its ``compatible``), beside the file type
they preserve (``kernel/fs/memfd_luo.py``) and from the boot's initcalls, as
``memfd_luo_init`` does; the LUO core never imports a handler. A LUO instance asks the
registry for the handlers of the formats its generation writes and reads.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from liveupdate.abi.formats import compatible_of
from liveupdate.errors import LiveUpdateError
from liveupdate.kernel.fs.file import File

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel


@dataclass
class Args:
    """``struct liveupdate_file_op_args``: what one operation works on."""

    file: File | None  # the preserved file; at finish, the retrieved one or None
    data: int = 0  # the serialized data (``serialized_data``)
    out_format: str = ""  # what this handover writes for the handler's component

    @property
    def private(self) -> object:
        """The file's own object (``file->private_data``: a memfd's inode)."""
        return None if self.file is None else self.file.private


class FileHandler(Protocol):
    compatible: str  # what the handover names the serialized data with
    format: str  # the component format (abi.generations.ORDER) the handler reads and writes
    component: str  # the component the format belongs to ("memfd")

    def can_preserve(self, f: File) -> bool: ...

    def preserve(self, a: Args) -> int:
        """Heavy work; returns the serialized data. All or nothing."""
        ...

    def unpreserve(self, a: Args) -> None: ...

    def freeze(self, a: Args) -> int:
        """Last update before the jump, in ``a.out_format``; returns the (new) data."""
        ...

    def unfreeze(self, a: Args) -> None: ...

    def retrieve(self, a: Args) -> File: ...

    def finish(self, a: Args) -> None: ...


Factory = Callable[["Kernel", str], FileHandler]
_REGISTRY: dict[str, tuple[str, Factory]] = {}


def register_file_handler(component: str, formats: Iterable[str], factory: Factory) -> None:
    """Register ``factory`` for each of ``formats`` of ``component`` (EEXIST when a format
    already has a handler: ``liveupdate_register_file_handler``'s duplicate check)."""
    for fmt in formats:
        if fmt in _REGISTRY:
            raise LiveUpdateError(err=errno.EEXIST, msg=f"luo: a handler for {fmt} is "
                                  "already registered")
        _REGISTRY[fmt] = (component, factory)


def handlers_for(k: Kernel, native: dict[str, str],
                 reads: dict[str, tuple[str, ...]]) -> list[FileHandler]:
    """The handlers of one LUO: per registered component, the native format's first (it
    preserves) and then the older ones it reads (negotiation: they only retrieve)."""
    out: list[FileHandler] = []
    for component in dict.fromkeys(c for c, _ in _REGISTRY.values()):
        mine = native.get(component)
        fmts = [mine, *(f for f in reads.get(component, ()) if f != mine)] if mine else []
        out += [_REGISTRY[f][1](k, f) for f in fmts if f in _REGISTRY]
    return out


def out_compatible(h: FileHandler, formats: dict[str, str]) -> str:
    """The ``compatible`` a handover written in ``formats`` names ``h``'s files with: that
    of the agreed format of its component, else of its own."""
    return compatible_of(formats.get(h.component, h.format))
