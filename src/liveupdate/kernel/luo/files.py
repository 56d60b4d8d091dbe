"""Preserved files, the lifecycle every LUO generation shares (``luo_files.c`` of v3,
``luo_file.c`` of mainline).

:class:`FileSet` is the outgoing set: files registered by token in order, each with its own
state (v3's per-file NORMAL -> PREPARED -> FROZEN). ``prepare_all`` and ``freeze_all`` run in
registration order and roll back, in reverse, everything they did when one file fails, so a
failure leaves the set exactly as it was. The set holds a reference to each file (``fget``):
the caller may close its fd right after preserving.

:class:`IncomingSet` is what the previous kernel preserved: ``retrieve`` builds a file once
(a second retrieve is the front end's business: v3 says EINVAL, mainline returns the same
file), ``finish`` hands every entry to its handler -- with the retrieved file, or ``None`` so
the handler frees memory nobody claimed.

v3 and mainline differ only in *when* the heavy work runs: v3 registers at FD_PRESERVE and
prepares at SET_EVENT(PREPARE); mainline prepares inside PRESERVE_FD. Both call this code.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from liveupdate.abi.uapi import State as FileState
from liveupdate.errors import AbiError, LiveUpdateError
from liveupdate.kernel.fs.file import File
from liveupdate.kernel.luo.handler import Args, FileHandler


@dataclass(eq=False)
class OutFile:
    token: int
    file: File
    handler: FileHandler
    state: FileState = FileState.NORMAL
    data: int = 0
    out_format: str = ""  # what the last freeze wrote (the plan's), "" = the handler's own

    def args(self, out_format: str = "") -> Args:
        return Args(self.file, self.data, out_format or self.out_format or self.handler.format)


def _errno_of(e: LiveUpdateError | AbiError) -> LiveUpdateError:
    return e if isinstance(e, LiveUpdateError) else LiveUpdateError(err=e.errno, msg=e.message)


class FileSet:
    def __init__(self, handlers: Callable[[], list[FileHandler]]) -> None:
        self._handlers = handlers
        self.files: dict[int, OutFile] = {}

    def __iter__(self) -> Iterator[OutFile]:
        return iter(list(self.files.values()))

    def __len__(self) -> int:
        return len(self.files)

    def get(self, token: int) -> OutFile:
        entry = self.files.get(token)
        if entry is None:
            raise LiveUpdateError(err=errno.ENOENT, msg=f"no preserved file with token "
                                  f"{token:#x}")
        return entry

    def handler_for(self, f: File) -> FileHandler:
        for h in self._handlers():  # the first registered handler that accepts it
            if h.can_preserve(f):
                return h
        raise LiveUpdateError(err=errno.ENOENT, msg=f"no LUO handler can preserve a "
                              f"{f.ops.name} file")

    def add(self, token: int, f: File) -> OutFile:
        handler = self.handler_for(f)
        if token in self.files:
            raise LiveUpdateError(err=errno.EEXIST, msg=f"token {token:#x} is already used")
        entry = OutFile(token, f.get(), handler)
        self.files[token] = entry
        return entry

    def remove(self, token: int) -> None:
        entry = self.get(token)
        self.cancel_one(entry)
        del self.files[token]
        entry.file.put()

    def clear(self) -> None:
        for entry in reversed(list(self.files.values())):
            self.remove(entry.token)

    # -- per-file transitions -------------------------------------------------------------
    def prepare_one(self, entry: OutFile) -> None:
        if entry.state is not FileState.NORMAL:
            return  # already prepared (per file, ahead of the global event)
        try:
            entry.data = entry.handler.preserve(entry.args())
        except (LiveUpdateError, AbiError) as e:
            raise _errno_of(e) from e
        entry.state = FileState.PREPARED

    def freeze_one(self, entry: OutFile, formats: dict[str, str] | None = None) -> None:
        """Freeze one file, writing its component's format from ``formats`` (the plan of
        this handover; its own when absent)."""
        if entry.state is FileState.FROZEN:
            return
        if entry.state is not FileState.PREPARED:
            raise LiveUpdateError(err=errno.EINVAL, msg=f"file {entry.token:#x} is not "
                                  "prepared")
        out = (formats or {}).get(entry.handler.component, entry.handler.format)
        try:
            entry.data = entry.handler.freeze(entry.args(out))
        except (LiveUpdateError, AbiError) as e:
            raise _errno_of(e) from e
        entry.state, entry.out_format = FileState.FROZEN, out

    def unfreeze_one(self, entry: OutFile) -> None:
        entry.handler.unfreeze(entry.args())
        entry.state, entry.out_format = FileState.PREPARED, ""

    def cancel_one(self, entry: OutFile) -> None:
        if entry.state is FileState.FROZEN:
            self.unfreeze_one(entry)
        if entry.state is FileState.PREPARED:
            entry.handler.unpreserve(entry.args())
            entry.state, entry.data = FileState.NORMAL, 0

    # -- the whole set, all or nothing ----------------------------------------------------
    def prepare_all(self) -> None:
        done: list[OutFile] = []
        try:
            for entry in self:
                if entry.state is FileState.NORMAL:
                    self.prepare_one(entry)
                    done.append(entry)
        except LiveUpdateError:
            for entry in reversed(done):
                self.cancel_one(entry)
            raise

    def freeze_all(self, formats: dict[str, str] | None = None) -> None:
        done: list[OutFile] = []
        try:
            for entry in self:
                if entry.state is FileState.PREPARED:
                    self.freeze_one(entry, formats)
                    done.append(entry)
        except LiveUpdateError:
            self.unfreeze_all(done)
            raise

    def unfreeze_all(self, entries: list[OutFile] | None = None) -> None:
        for entry in reversed(list(self) if entries is None else entries):
            if entry.state is FileState.FROZEN:
                self.unfreeze_one(entry)

    def cancel_all(self) -> None:
        for entry in reversed(list(self.files.values())):
            self.cancel_one(entry)


@dataclass(eq=False)
class InFile:
    token: int
    compatible: str
    data: int
    handler: FileHandler
    file: File | None = None
    finished: bool = False


class IncomingSet:
    def __init__(self) -> None:
        self.files: dict[int, InFile] = {}

    def __len__(self) -> int:
        return len(self.files)

    def get(self, token: int) -> InFile:
        entry = self.files.get(token)
        if entry is None:
            raise LiveUpdateError(err=errno.ENOENT, msg=f"no incoming file with token "
                                  f"{token:#x}")
        return entry

    def retrieve(self, entry: InFile) -> File:
        if entry.file is None:
            try:
                entry.file = entry.handler.retrieve(Args(None, entry.data)).get()  # LUO's
            except AbiError as e:
                raise _errno_of(e) from e
        return entry.file

    def finish_one(self, entry: InFile) -> None:
        if entry.finished:
            return
        entry.handler.finish(Args(entry.file, entry.data))
        entry.finished = True
        del self.files[entry.token]
        if entry.file is not None:
            entry.file.put()

    def finish_all(self) -> None:
        for entry in reversed(list(self.files.values())):
            self.finish_one(entry)
