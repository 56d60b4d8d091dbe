"""The one file-handler interface of LUO (``include/linux/liveupdate.h``,
``struct liveupdate_file_ops``), implemented by every preservable file type.

The operations come in symmetric pairs, as upstream's: ``preserve``/``unpreserve`` (the heavy
work -- pin, fill holes, freeze the size, preserve memory, serialize -- and its undo),
``freeze``/``unfreeze`` (the last update inside ``reboot()`` and its rollback),
``retrieve``/``finish`` (the next kernel builds a file from the serialized data; finish
releases what was preserved, freeing it when the file was never retrieved).

``preserve`` is v3's ``prepare`` (run at SET_EVENT(PREPARE)) and mainline's ``preserve``
(run at PRESERVE_FD); ``unpreserve`` is v3's ``cancel``. The serialized data is one u64, as
in every generation: what it points at is the handler's own format, named by
``compatible`` (the format table, :mod:`liveupdate.abi.formats`).
"""

from __future__ import annotations

from typing import Protocol

from liveupdate.kernel.fs.file import File


class FileHandler(Protocol):
    compatible: str

    def can_preserve(self, f: File) -> bool: ...

    def preserve(self, f: File) -> int:
        """Heavy work; returns the serialized data. All or nothing."""
        ...

    def unpreserve(self, f: File, data: int) -> None: ...

    def freeze(self, f: File, data: int) -> int:
        """Last update before the jump; returns the (possibly new) data."""
        ...

    def unfreeze(self, f: File, data: int) -> None: ...

    def retrieve(self, data: int) -> File: ...

    def finish(self, data: int, retrieved: File | None) -> None: ...
