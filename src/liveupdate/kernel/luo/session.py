"""LUO of mainline Linux (6.19; 7.0 with FLB; 7.1 with GET_NAME and ``memfd-v2``; 7.2 with
``luo-v5``; spec/luo.md 2-5): sessions. A thin front end over the same file lifecycle,
handlers and memfd code as v3.

``/dev/liveupdate`` (a single opener: EBUSY) creates *outgoing* sessions by name and retrieves
*incoming* ones. A session fd preserves fds by token -- the heavy work runs inside PRESERVE_FD
-- and in the next kernel retrieves them and finishes. There is no global state machine:
closing an outgoing session fd before the reboot unpreserves its files (the abort path); the
sessions whose fds are still open at ``reboot(KEXEC)`` are frozen, in creation order and each
file in preservation order, and serialized; a failure unfreezes everything already frozen and
``reboot()`` fails with the errno, the sessions still usable. Closing /dev/liveupdate never
touches sessions.

The handover formats and their limits are :mod:`.handover`'s (one object per format), the
reboot is :mod:`.session_freeze`, the behaviours that changed at 7.1 are :mod:`.rules`. The
next kernel checks the LUO data at boot; anything it cannot read (compatible, missing FLB node
on 7.0+, a malformed header) is ``luo_restore_fail()``: a panic. The first open of
/dev/liveupdate builds the incoming sessions; a file whose handler this kernel lacks
(``memfd-v1`` on 7.1) makes that and every later open fail with EIO.

Errnos and check orders are those of spec/luo.md 2.1 and 2.3: CREATE_SESSION EEXIST for a
used outgoing name (6.19 ``strscpy`` truncation to 63 bytes, an empty name accepted; 7.3's
EINVAL for both and its other changes are :mod:`.rules`);
RETRIEVE_SESSION ENOENT unknown, EINVAL when already retrieved this boot; PRESERVE_FD EEXIST
token, ENOSPC, EBADF, (7.1) EBUSY when the file is already in a session, ENOENT without a
handler, then the handler's errno; RETRIEVE_FD ENOENT, repeatable (the same file; 7.1 keeps a
failure sticky); FINISH frees what was never retrieved, is idempotent and runs implicitly when
a retrieved session fd is closed, which also removes the session (``luo_session_release``).
Deliberately like 7.2 rather than 6.19, PRESERVE_FD on a retrieved session and
RETRIEVE_FD/FINISH on an outgoing one are EINVAL: 6.19's ungated FINISH on live files is a bug
nobody should rely on.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from liveupdate.abi import generations, luo_session, uapi
from liveupdate.abi.consts import PAGE_SIZE
from liveupdate.errors import LiveUpdateError
from liveupdate.kernel import negotiate
from liveupdate.kernel.fs.file import File
from liveupdate.kernel.luo import session_freeze, session_incoming, session_ioctl
from liveupdate.kernel.luo.blocks import BlockSet
from liveupdate.kernel.luo.files import FileSet, IncomingSet
from liveupdate.kernel.luo.flb import FlbRegistry
from liveupdate.kernel.luo.handler import FileHandler
from liveupdate.kernel.luo.handover import HANDOVERS
from liveupdate.kernel.luo.rules import rules_of

if TYPE_CHECKING:
    from liveupdate.kernel.kernel import Kernel

LUO_KHO_ENTRY_NAME = "LUO"
Resolve = Callable[[int], File]


@dataclass(eq=False)
class Session:
    name: str
    files: FileSet | None = None  # outgoing
    incoming: IncomingSet | None = None  # retrieved from the previous kernel
    files_array: int = 0  # the outgoing luo_file_ser block, once a file was preserved
    retrieved: bool = False
    errors: dict[int, LiveUpdateError] = field(default_factory=dict)  # 7.1: sticky
    blocks: BlockSet | None = None  # 7.3.4: its file chain's blocks, from PRESERVE_FD on
    in_blocks: list[int] = field(default_factory=list)  # 7.3.4: incoming, freed at FINISH


class LuoSessions:
    """The sessions front end of one LUO generation row (:data:`abi.generations.LUO`): its
    uAPI, its handover writer (:mod:`.handover`), its rules (:mod:`.rules`) and the file
    handlers the kernel registered for the formats it writes and reads."""

    def __init__(self, k: Kernel, gen: generations.LuoGeneration,
                 handlers: list[FileHandler], reads: dict[str, tuple[str, ...]]) -> None:
        self.k = k
        self.row = gen
        self.gen = uapi.Gen(gen.uapi)
        self.rules = rules_of(gen)
        self.writer = HANDOVERS[gen.luo]
        self.has_flb = gen.flb in generations.FLB_NODE  # 7.0+
        self.reads = reads
        self.handlers = handlers  # the native handler first: it preserves; others retrieve
        self.flbs = FlbRegistry()
        self.device = session_ioctl.DeviceOps(self)
        self.session_ops = session_ioctl.SessionOps(self)
        self.device_open = False
        self.outgoing: dict[str, Session] = {}
        self.incoming: dict[str, Session] = {}
        self.number = 0
        self.restore_failed = ""  # sticky EIO for every open
        self.frozen = False
        self.incoming_raw: list[luo_session.SessionSer] | None = None
        self.incoming_meta: list[int] = []  # LUO pages given back at the first open
        self.incoming_ser = 0  # 7.3.4: the luo_ser page, given back at boot
        self.incoming_later: Callable[[dict[str, list[int]]],
                                      list[luo_session.SessionSer]] | None = None
        self.flbs_raw: list[luo_session.FlbSer] = []
        self.fdt = self.header = self.flb_header = self.ser = 0
        self.published = 0  # the blob the LUO subtree points at
        self.serialized: list[tuple[int, int]] = []  # pages the last serialization allocated
        self.session_blocks = BlockSet(k, luo_session.SESSION_DTYPE.itemsize)  # 7.3.4

    # -- boot -----------------------------------------------------------------------------
    def boot(self) -> None:
        """``luo_early_startup``: read and check the previous kernel's LUO data (a panic
        when unreadable), then build this kernel's outgoing LUO blob in the live KHO tree
        (its handover writer's format), with the FLB header page first (7.0+)."""
        self.read_incoming()
        if self.has_flb:
            self.flb_header = self.k.require_kho().alloc_preserve(PAGE_SIZE)
            self.k.write(self.flb_header, luo_session.encode_flbs([]))
        self.writer.boot(self)
        session_incoming.free_ser(self)

    def read_incoming(self) -> None:
        """The incoming half of ``luo_early_startup``: the LUO subtree, if the previous kernel
        left one. A lookup failure other than ENOENT panics where the rules say so (7.3.4:
        ``luo_restore_fail``); older rules take it as no LUO data."""
        kin = self.k.kho_in
        if kin is None:
            return
        try:
            phys = kin.retrieve_subtree(LUO_KHO_ENTRY_NAME)
        except LiveUpdateError as e:
            if e.errno != errno.ENOENT and self.rules.panic_on_subtree_error:
                self.k.panic(f"LUO: the incoming tree failed to initialize properly "
                             f"({e.message}), disabling live update")
            phys = 0
        if phys:
            session_incoming.read(self, phys, kin.root.size(LUO_KHO_ENTRY_NAME))

    def incoming_flb(self, name: str) -> int:
        """The data of the previous kernel's FLB ``name`` (0: none), readable at boot before
        the sessions are deserialized -- the early-boot FLB access the posted hugetlb and
        IOMMU series add, for the drivers that take hardware over at init."""
        return next((f.data for f in self.flbs_raw if f.name == name), 0)

    def publish(self, phys: int, size: int) -> None:
        """The LUO subtree is ``phys`` (replacing another one: negotiation)."""
        if self.published == phys:
            return
        kout = self.k.require_kho()
        if self.published:
            kout.remove_subtree(self.published)
        kout.add_subtree(LUO_KHO_ENTRY_NAME, phys, size)
        self.published = phys

    def _deserialize(self) -> None:
        """First open: :func:`liveupdate.kernel.luo.session_incoming.deserialize`."""
        built = session_incoming.deserialize(self)
        if built is not None:
            self.incoming = {name: Session(name, incoming=inc, in_blocks=blocks)
                             for name, (inc, blocks) in built.items()}
        if self.settled:
            self.k.say_settled()

    # -- /dev/liveupdate ------------------------------------------------------------------
    def open(self) -> File:
        if self.device_open:
            raise LiveUpdateError(err=errno.EBUSY, msg="/dev/liveupdate is already open")
        self._deserialize()
        if self.restore_failed:
            raise LiveUpdateError(err=errno.EIO, msg=f"/dev/liveupdate: restoring the "
                                  f"incoming sessions failed ({self.restore_failed})")
        self.device_open = True
        return File(self.device)

    def create(self, name: str) -> File:
        if name in self.outgoing:
            raise LiveUpdateError(err=errno.EEXIST, msg=f"session {name!r} exists")
        limit = self.writer.session_max
        if limit is not None and len(self.outgoing) >= limit:
            raise LiveUpdateError(err=errno.ENOMEM, msg=f"more than {limit}"
                                  " sessions do not fit the session header")
        s = Session(name, files=FileSet(lambda: self.handlers))
        if self.rules.blocks_at_ioctl:
            self.session_blocks.grow(len(self.outgoing) + 1)
            s.blocks = BlockSet(self.k, luo_session.FILE_DTYPE.itemsize)
        self.outgoing[name] = s
        return File(self.session_ops, s)

    def retrieve_session(self, name: str | None) -> File:
        """``name`` None: a name field that matches no session (:mod:`.rules`)."""
        s = None if name is None else self.incoming.get(name)
        if s is None:
            raise LiveUpdateError(err=errno.ENOENT, msg=f"no incoming session {name!r}")
        if s.retrieved:
            raise LiveUpdateError(err=errno.EINVAL, msg=f"session {name!r} was already "
                                  "retrieved in this boot")
        s.retrieved = True
        return File(self.session_ops, s)

    # -- a session fd ---------------------------------------------------------------------
    def _in_any_session(self, f: File) -> bool:
        ident = f.private
        for s in self.outgoing.values():
            if s.files is not None and any(e.file.private is ident for e in s.files):
                return True
        return any(e.file is not None and e.file.private is ident
                   for s in self.incoming.values() if s.incoming is not None
                   for e in s.incoming.files.values())

    def preserve(self, s: Session, token: int, fds: list[int], resolve: Resolve) -> None:
        if s.files is None:
            raise LiveUpdateError(err=errno.EINVAL, msg="PRESERVE_FD on a retrieved session")
        if token in s.files.files:
            raise LiveUpdateError(err=errno.EEXIST, msg=f"token {token:#x} is already used "
                                  f"in session {s.name!r}")
        limit = self.writer.file_max
        if limit is not None and len(s.files) >= limit:
            raise LiveUpdateError(err=errno.ENOSPC, msg=f"session {s.name!r} holds "
                                  f"{limit} files")
        if not fds:
            raise LiveUpdateError(err=errno.EBADF, msg="PRESERVE_FD: bad fd")
        f = resolve(fds[0])
        self.rules.check_preserve(f, self._in_any_session)
        if s.blocks is not None:
            s.blocks.grow(len(s.files) + 1)
        try:
            entry = s.files.add(token, f)
        except LiveUpdateError:
            if s.blocks is not None:
                s.blocks.shrink(len(s.files))
            raise
        try:
            self.flbs.file_preserved(entry.handler.compatible)
            try:
                s.files.prepare_one(entry)
            except LiveUpdateError:
                self.flbs.file_unpreserved(entry.handler.compatible)
                raise
        except LiveUpdateError:
            del s.files.files[token]
            f.put()
            if s.blocks is not None:
                s.blocks.shrink(len(s.files))
            raise
        if not s.files_array and self.writer.files_array_at_preserve:
            s.files_array = self.k.require_kho().alloc_preserve(luo_session.FILE_BLOCK)

    def retrieve_fd(self, s: Session, token: int) -> File:
        if s.incoming is None:
            raise LiveUpdateError(err=errno.EINVAL, msg="RETRIEVE_FD on an outgoing session")
        self.k.fault_point("luo_retrieve")
        if token in s.errors:
            raise s.errors[token]
        entry = s.incoming.get(token)
        first = entry.file is None
        try:
            f = s.incoming.retrieve(entry)
        except LiveUpdateError as e:
            self.rules.retrieve_failed(s.errors, token, e)
            raise
        if first:
            self.flbs.file_retrieved(entry.handler.compatible)
        return f

    def finish(self, s: Session) -> None:
        if s.incoming is None:
            raise LiveUpdateError(err=errno.EINVAL, msg="FINISH on an outgoing session")
        for entry in reversed(list(s.incoming.files.values())):
            s.incoming.finish_one(entry)
            self.flbs.file_finished(entry.handler.compatible)
        session_incoming.finish_blocks(self, s.in_blocks)

    @property
    def settled(self) -> bool:
        """Every incoming session is released, or none came (nothing left to build at the
        first open, or building them failed)."""
        return not self.incoming and not self.incoming_raw and self.incoming_later is None

    def close(self, s: Session) -> None:
        """The last handle of a session fd is gone."""
        if self.frozen:
            return  # the reboot is under way: frozen means frozen
        if s.incoming is not None:
            # luo_session_release: an implicit FINISH, then the session leaves the incoming
            # list (a later RETRIEVE_SESSION of the name is ENOENT)
            self.finish(s)
            self.incoming.pop(s.name, None)
            if self.settled:
                self.k.say_settled()
            return
        assert s.files is not None
        for entry in reversed(list(s.files)):
            compat = entry.handler.compatible
            s.files.remove(entry.token)
            self.flbs.file_unpreserved(compat)
        if s.files_array and (s.files_array, luo_session.FILE_BLOCK) not in self.serialized:
            self.k.require_kho().unpreserve_free(s.files_array, luo_session.FILE_BLOCK)
        del self.outgoing[s.name]
        if s.blocks is not None:
            s.blocks.shrink(0)
            self.session_blocks.shrink(len(self.outgoing))

    # -- reboot ---------------------------------------------------------------------------
    def freeze(self, formats: dict[str, str]) -> None:
        """``liveupdate_reboot``: :func:`liveupdate.kernel.luo.session_freeze.freeze`."""
        session_freeze.freeze(self, formats)

    def alloc_at_reboot(self, size: int = PAGE_SIZE) -> int:
        """A preserved allocation made by this reboot's serialization (given back if the
        freeze fails)."""
        p = self.k.require_kho().alloc_preserve(size)
        self.serialized.append((p, size))
        return p

    def release_serialized(self) -> None:
        """Give back what the last serialization allocated, and forget the pointers into it
        (a kernel whose format allocates at the reboot has none before)."""
        kout = self.k.require_kho()
        gone = {p for p, _ in self.serialized}
        for p, size in self.serialized:
            kout.unpreserve_free(p, size)
        self.header = 0 if self.header in gone else self.header
        self.fdt = 0 if self.fdt in gone else self.fdt
        for s in self.outgoing.values():
            s.files_array = 0 if s.files_array in gone else s.files_array
        self.serialized = []

    def check_limits(self, luo_format: str, what: str) -> None:
        session_freeze.check_limits(self, luo_format, what)

    def enabled_message(self) -> str:
        return (f"luo: LUO {self.row.name} enabled (sessions), live update "
                f"{self.number}")

    def outgoing_files(self) -> list[tuple[str, File, str]]:
        """Every outgoing file, how an error names it and its handler's component."""
        return [(f"session {s.name!r} token {e.token:#x}", e.file, e.handler.component)
                for s in self.outgoing.values() for e in s.files or []]

    # -- reports --------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {
            "generation": str(self.gen), "luo": self.row.name,
            "handover": negotiate.written(self.k), "liveupdate_number": self.number,
            "device_open": self.device_open, "restore_failed": self.restore_failed or None,
            "sessions": [{"name": s.name, "files": [
                {"token": f"{e.token:#x}", "compatible": e.handler.compatible,
                 "state": e.state.name.lower(), "data": f"{e.data:#x}"}
                for e in (s.files or [])]} for s in self.outgoing.values()],
            "incoming": [{"name": s.name, "retrieved": s.retrieved, "files": [
                {"token": f"{e.token:#x}", "compatible": e.compatible,
                 "retrieved": e.file is not None}
                for e in (s.incoming.files.values() if s.incoming else [])]}
                for s in self.incoming.values()],
            "pending_incoming": len(self.incoming_raw or []),
            "flbs": [{"name": f.ops.name, "count": f.count} for f in self.flbs.flbs],
        }

