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

The handover, as ``luo_session.c``/``luo_core.c`` write it: at boot a one-page ``luo-v1`` FDT
(``liveupdate-number`` = the previous one + 1) with the ``luo-session-v2`` node pointing at a
16-page session header; 7.0 adds the ``luo-flb-v1`` node and its header page. Each session
with files has a 2-page ``luo_file_ser`` array. Limits as 6.19-7.1 have them (the format's):
819 sessions (ENOMEM on the 820th), 128 files per session (ENOSPC on the 129th).

The next kernel checks the FDT and the session header at boot; anything it cannot read
(compatible, missing FLB node on 7.0+, a malformed header) is ``luo_restore_fail()``: a panic.
The first open of /dev/liveupdate builds the incoming sessions; a file whose handler this
kernel lacks (``memfd-v1`` on 7.1) makes that and every later open fail with EIO.

7.2 (``luo-v5``) keeps the luo_ser blob from boot and writes block chains at the reboot: the
session and file limits of the arrays are gone (a negotiated ``luo-v1`` handover checks them
at the load and at ``reboot()``).

Errnos and check orders are those of spec/luo.md 2.1 and 2.3: CREATE_SESSION EEXIST for a
used outgoing name (6.19 ``strscpy`` truncation to 63 bytes; an empty name is accepted);
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

from liveupdate.abi import luo_ser, luo_session, uapi
from liveupdate.abi.consts import PAGE_SIZE
from liveupdate.abi.uapi import Gen, State, Target
from liveupdate.errors import AbiError, LiveUpdateError
from liveupdate.kernel import kho, negotiate
from liveupdate.kernel.fs.file import File
from liveupdate.kernel.fs.memfd_luo import MemfdSerHandler
from liveupdate.kernel.luo.files import FileSet, IncomingSet, InFile
from liveupdate.kernel.luo.flb import FlbRegistry, IncomingFlb
from liveupdate.kernel.luo.handler import FileHandler

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


class DeviceOps:
    name = "liveupdate"

    def __init__(self, luo: LuoSessions) -> None:
        self.luo = luo

    def release(self, f: File) -> None:
        self.luo.device_open = False  # sessions are independent files: untouched

    def ioctl(self, f: File, cmd: int, arg: bytes, fds: list[int],
              resolve: Resolve) -> tuple[bytes, list[File]]:
        return self.luo.device_ioctl(cmd, arg)


class SessionOps:
    name = "luo_session"

    def __init__(self, luo: LuoSessions) -> None:
        self.luo = luo

    def release(self, f: File) -> None:
        self.luo.close(f.private)

    def ioctl(self, f: File, cmd: int, arg: bytes, fds: list[int],
              resolve: Resolve) -> tuple[bytes, list[File]]:
        return self.luo.session_ioctl(f.private, cmd, arg, fds, resolve)


class LuoSessions:
    def __init__(self, k: Kernel, gen: Gen) -> None:
        self.k = k
        self.gen = gen
        self.v7 = gen is Gen.V7_1  # the 7.1+ uAPI: GET_NAME, EBUSY, sticky errors
        native = k.image.native()
        self.native_luo = native["luo"]  # luo-v1 (6.19-7.1) or luo-v5 (7.2)
        self.has_flb = native["flb"] == "luo-flb-v1"  # 7.0+
        self.reads = negotiate.code_reads(k)
        # the native handler first: it preserves; the others only retrieve (negotiation)
        mfds = [native["memfd"], *(f for f in self.reads["memfd"] if f != native["memfd"])]
        self.handlers: list[FileHandler] = [MemfdSerHandler(k, f) for f in mfds]
        self.flbs = FlbRegistry()
        self.device = DeviceOps(self)
        self.session_ops = SessionOps(self)
        self.device_open = False
        self.outgoing: dict[str, Session] = {}
        self.incoming: dict[str, Session] = {}
        self.number = 0
        self.restore_failed = ""  # sticky EIO for every open
        self.frozen = False
        self._incoming_raw: list[luo_session.SessionSer] | None = None
        self._incoming_meta: list[int] = []
        self._flbs_raw: list[luo_session.FlbSer] = []
        self.fdt = self.header = self.flb_header = self.ser = 0
        self.published = 0  # the blob the LUO subtree points at
        self._serialized: list[tuple[int, int]] = []  # pages the last serialization allocated

    # -- boot -----------------------------------------------------------------------------
    def boot(self) -> None:
        """``luo_early_startup``: read and check the previous kernel's LUO data (a panic
        when unreadable), then build this kernel's outgoing LUO blob in the live KHO tree:
        the ``luo-v1`` FDT with its session header (and FLB header, 7.0+), or 7.2's
        ``luo_ser``."""
        kin = self.k.kho_in
        if kin is not None:
            try:
                phys = kin.retrieve_subtree(LUO_KHO_ENTRY_NAME)
            except LiveUpdateError:
                phys = 0
            if phys:
                self._read_incoming(phys, kin.root.size(LUO_KHO_ENTRY_NAME))
        kout = self.k.require_kho()
        if self.has_flb:
            self.flb_header = kout.alloc_preserve(PAGE_SIZE)
            self.k.write(self.flb_header, luo_session.encode_flbs([]))
        if self.native_luo == "luo-v5":
            self.ser = kout.store(luo_ser.encode(luo_ser.LuoSer(self.number + 1, 0,
                                                               self.flb_header)))
            self._publish(self.ser, luo_ser.LUO_SER.size)
            return
        self.header = kout.alloc_preserve(luo_session.SESSION_BLOCK)
        self.k.write(self.header, luo_session.encode_sessions([]))
        blob = luo_session.encode_luo_fdt(self.number + 1, self.header,
                                          self.flb_header if self.has_flb else None)
        self.fdt = kout.store(blob)
        self._publish(self.fdt, len(blob))

    def _publish(self, phys: int, size: int) -> None:
        """The LUO subtree is ``phys`` (replacing another one: negotiation)."""
        if self.published == phys:
            return
        kout = self.k.require_kho()
        if self.published:
            kout.remove_subtree(self.published)
        kout.add_subtree(LUO_KHO_ENTRY_NAME, phys, size)
        self.published = phys

    def _read_incoming(self, phys: int, size: int | None) -> None:
        """Dispatch on what this kernel reads: an FDT (``luo-v1``) or a ``luo_ser``
        (``luo-v5``). A native kernel tries only its own -- 6.19 meets 7.2's struct as a bad
        FDT, 7.2 meets 6.19's FDT as a wrong ``compatible`` -- and panics, as Linux."""
        reads = self.reads["luo"]
        try:
            is_fdt = self.k.mem.read(phys, 4, "LUO blob") == b"\xd0\x0d\xfe\xed"
            if "luo-v1" in reads and (is_fdt or "luo-v5" not in reads):
                fdt = luo_session.decode_luo_fdt(
                    self.k.mem.read_fdt(phys, "LUO FDT"),
                    require_flb=self.reads.get("flb") == ("luo-flb-v1",))
                self._incoming_raw = luo_session.decode_sessions(self.k.mem, fdt.session_header)
                number, flbs = fdt.liveupdate_number, fdt.flb_header or 0
                meta = [phys, fdt.session_header] + [
                    s.files_phys for s in self._incoming_raw if s.files]
            else:
                # luo_early_startup: the blob must hold a luo_ser (kho-v1 roots carry no size)
                want = luo_ser.LUO_SER.size if size is None else min(size, PAGE_SIZE)
                ser = luo_ser.decode(self.k.mem.read(phys, want, "luo_ser"))
                self._incoming_raw, blocks = luo_ser.decode_sessions(self.k.mem,
                                                                     ser.sessions_pa)
                number, flbs = ser.liveupdate_number, ser.flbs_pa
                meta = [phys, *blocks]
            if flbs:
                self._flbs_raw = luo_session.decode_flbs(self.k.mem, flbs)
                meta.append(flbs)
        except AbiError as e:
            self.k.panic(f"LUO: cannot restore the previous kernel's state: {e.message}")
        self.number = number
        self._incoming_meta = meta
        self.k.printk(f"luo: live update {self.number}: {len(self._incoming_raw)} incoming "
                      "sessions")

    def _deserialize(self) -> None:
        """First open: build the incoming sessions (``luo_session_deserialize``, once)."""
        raw, self._incoming_raw = self._incoming_raw, None
        if raw is None:
            return
        by_compat = {h.compatible: h for h in self.handlers}
        sessions: dict[str, Session] = {}
        for s in raw:
            inc = IncomingSet()
            for f in s.files:
                handler = by_compat.get(f.compatible)
                if handler is None:
                    self.restore_failed = (f"session {s.name!r}: no handler for "
                                           f"{f.compatible!r}")
                    self.k.printk(f"luo: {self.restore_failed}; /dev/liveupdate is EIO")
                    return
                inc.files[f.token] = InFile(f.token, f.compatible, f.data, handler)
            sessions[s.name] = Session(s.name, incoming=inc)
        self.incoming = sessions
        self.flbs.incoming = {f.name: IncomingFlb(f.name, f.data, f.count)
                              for f in self._flbs_raw}
        for p in self._incoming_meta:  # the previous kernel's LUO pages: read, give back
            kho.restore_free(self.k.kho_in, self.k, p)
        self._incoming_meta = []

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

    def _lookup(self, target: Target, cmd: int, arg: bytes) -> tuple[uapi.Ioctl,
                                                                     dict[str, Any]]:
        try:
            return uapi.lookup(self.gen, target, cmd, arg)
        except AbiError as e:
            raise LiveUpdateError(err=e.errno, msg=e.message) from e

    def _frozen_check(self) -> None:
        if self.frozen:
            raise LiveUpdateError(err=errno.EBUSY, msg="LUO: the reboot is under way")

    def device_ioctl(self, cmd: int, arg: bytes) -> tuple[bytes, list[File]]:
        entry, a = self._lookup(Target.DEVICE, cmd, arg)
        self._frozen_check()
        try:
            name = uapi.session_name(a["name"], strict=False)
        except AbiError as e:  # names are bytes to Linux; ours must be UTF-8 (documented)
            raise LiveUpdateError(err=e.errno, msg=e.message) from e
        create = entry.name == "CREATE_SESSION"
        f = self._create(name) if create else self._retrieve_session(name)
        reply = entry.pack(**{**a, "fd": 0})
        return reply[: min(a["size"], entry.size)], [f]

    def _create(self, name: str) -> File:
        if name in self.outgoing:
            raise LiveUpdateError(err=errno.EEXIST, msg=f"session {name!r} exists")
        if self.native_luo == "luo-v1" and len(self.outgoing) >= luo_session.SESSION_MAX:
            raise LiveUpdateError(err=errno.ENOMEM, msg=f"more than {luo_session.SESSION_MAX}"
                                  " sessions do not fit the session header")
        s = Session(name, files=FileSet(lambda: self.handlers))
        self.outgoing[name] = s
        return File(self.session_ops, s)

    def _retrieve_session(self, name: str) -> File:
        s = self.incoming.get(name)
        if s is None:
            raise LiveUpdateError(err=errno.ENOENT, msg=f"no incoming session {name!r}")
        if s.retrieved:
            raise LiveUpdateError(err=errno.EINVAL, msg=f"session {name!r} was already "
                                  "retrieved in this boot")
        s.retrieved = True
        return File(self.session_ops, s)

    # -- a session fd ---------------------------------------------------------------------
    def session_ioctl(self, s: Session, cmd: int, arg: bytes, fds: list[int],
                      resolve: Resolve) -> tuple[bytes, list[File]]:
        entry, a = self._lookup(Target.SESSION, cmd, arg)
        self._frozen_check()
        out: dict[str, Any] = {}
        new: list[File] = []
        if entry.name == "SESSION_PRESERVE_FD":
            self._preserve(s, a["token"], fds, resolve)
        elif entry.name == "SESSION_RETRIEVE_FD":
            new.append(self._retrieve_fd(s, a["token"]))
            out["fd"] = 0
        elif entry.name == "SESSION_FINISH":
            self._finish(s)
        elif entry.name == "SESSION_GET_NAME":
            if a["reserved"]:
                raise LiveUpdateError(err=errno.EINVAL, msg="GET_NAME: reserved must be 0")
            out["name"] = s.name.encode()
        reply = entry.pack(**{**a, **out})
        return reply[: min(a["size"], entry.size)], new

    def _in_any_session(self, f: File) -> bool:
        ident = f.private
        for s in self.outgoing.values():
            if s.files is not None and any(e.file.private is ident for e in s.files):
                return True
        return any(e.file is not None and e.file.private is ident
                   for s in self.incoming.values() if s.incoming is not None
                   for e in s.incoming.files.values())

    def _preserve(self, s: Session, token: int, fds: list[int], resolve: Resolve) -> None:
        if s.files is None:
            raise LiveUpdateError(err=errno.EINVAL, msg="PRESERVE_FD on a retrieved session")
        if token in s.files.files:
            raise LiveUpdateError(err=errno.EEXIST, msg=f"token {token:#x} is already used "
                                  f"in session {s.name!r}")
        if self.native_luo == "luo-v1" and len(s.files) >= luo_session.FILE_MAX:
            raise LiveUpdateError(err=errno.ENOSPC, msg=f"session {s.name!r} holds "
                                  f"{luo_session.FILE_MAX} files")
        if not fds:
            raise LiveUpdateError(err=errno.EBADF, msg="PRESERVE_FD: bad fd")
        f = resolve(fds[0])
        if self.v7 and self._in_any_session(f):
            raise LiveUpdateError(err=errno.EBUSY, msg="PRESERVE_FD: the file is already "
                                  "preserved in a session")
        entry = s.files.add(token, f)
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
            raise
        if not s.files_array and self.native_luo == "luo-v1":  # 7.2: chains at the reboot
            s.files_array = self.k.require_kho().alloc_preserve(luo_session.FILE_BLOCK)

    def _retrieve_fd(self, s: Session, token: int) -> File:
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
            if self.v7:
                s.errors[token] = e
            raise
        if first:
            self.flbs.file_retrieved(entry.handler.compatible)
        return f

    def _finish(self, s: Session) -> None:
        if s.incoming is None:
            raise LiveUpdateError(err=errno.EINVAL, msg="FINISH on an outgoing session")
        for entry in reversed(list(s.incoming.files.values())):
            s.incoming.finish_one(entry)
            self.flbs.file_finished(entry.handler.compatible)

    def close(self, s: Session) -> None:
        """The last handle of a session fd is gone."""
        if self.frozen:
            return  # the reboot is under way: frozen means frozen
        if s.incoming is not None:
            # luo_session_release: an implicit FINISH, then the session leaves the incoming
            # list (a later RETRIEVE_SESSION of the name is ENOENT)
            self._finish(s)
            self.incoming.pop(s.name, None)
            return
        assert s.files is not None
        for entry in reversed(list(s.files)):
            compat = entry.handler.compatible
            s.files.remove(entry.token)
            self.flbs.file_unpreserved(compat)
        if s.files_array and (s.files_array, luo_session.FILE_BLOCK) not in self._serialized:
            self.k.require_kho().unpreserve_free(s.files_array, luo_session.FILE_BLOCK)
        del self.outgoing[s.name]

    # -- reboot ---------------------------------------------------------------------------
    def freeze(self) -> None:
        """``liveupdate_reboot``: freeze every file of every open session, then write the
        session header, the file arrays and the FLB header. All or nothing."""
        done: list[FileSet] = []
        try:
            for s in self.outgoing.values():
                assert s.files is not None
                s.files.freeze_all()
                done.append(s.files)
            self._serialize()
        except (LiveUpdateError, AbiError) as e:
            for fs in reversed(done):
                for entry in reversed(list(fs)):
                    entry.handler.unfreeze(entry.file, entry.data)
                    entry.state = State.PREPARED
            raise LiveUpdateError(err=e.errno, msg=f"LUO: freeze: {e.message}") from e
        self.frozen = True
        self.k.printk(f"luo: froze {len(self.outgoing)} sessions")

    def _release_serialized(self) -> None:
        kout = self.k.require_kho()
        for p, size in self._serialized:
            kout.unpreserve_free(p, size)
        if self._serialized and self.native_luo == "luo-v5":  # what it allocated is gone
            self.header = self.fdt = 0
            for s in self.outgoing.values():
                s.files_array = 0
        self._serialized = []

    def _alloc(self, size: int = PAGE_SIZE) -> int:
        p = self.k.require_kho().alloc_preserve(size)
        self._serialized.append((p, size))
        return p

    def _out_compatible(self, handler: FileHandler) -> str:
        """A file's handler as this handover names it: memfd's is the agreed format."""
        if isinstance(handler, MemfdSerHandler):
            return negotiate.out_format(self.k, "memfd") or handler.compatible
        return handler.compatible

    def _serialize(self) -> None:
        """Write the sessions in the format this handover uses (``luo-v1`` arrays or
        ``luo-v5`` block chains; negotiation may pick the older one), with or without the FLB
        node. Pages needed only now (7.2's chains; a 7.2 kernel writing luo-v1) are
        allocated here and given back if the freeze fails."""
        self._release_serialized()
        fmt = negotiate.out_format(self.k, "luo")
        flb = negotiate.out_format(self.k, "flb") == "luo-flb-v1" and self.has_flb
        try:
            sessions = [(s.name, [luo_session.FileSer(self._out_compatible(e.handler), e.data,
                                                      e.token) for e in (s.files or [])])
                        for s in self.outgoing.values()]
            if flb:
                self.k.write(self.flb_header, luo_session.encode_flbs(self.flbs.serialize()))
            if fmt == "luo-v5":
                first, pages = luo_ser.encode_sessions(sessions, self._alloc)
                for p, page in pages.items():
                    self.k.write(p, page)
                self.k.write(self.ser, luo_ser.encode(luo_ser.LuoSer(
                    self.number + 1, first, self.flb_header)))
                self._publish(self.ser, luo_ser.LUO_SER.size)
                return
            rows: list[tuple[str, int, int]] = []
            for (name, files), s in zip(sessions, self.outgoing.values(), strict=True):
                if files and not s.files_array:
                    s.files_array = self._alloc(luo_session.FILE_BLOCK)
                if files:
                    self.k.write(s.files_array, luo_session.encode_files(files))
                rows.append((name, s.files_array if files else 0, len(files)))
            if not self.header:  # 7.2 writing luo-v1: the header and FDT only now
                self.header = self._alloc(luo_session.SESSION_BLOCK)
                self.fdt = self._alloc()
            self.k.write(self.header, luo_session.encode_sessions(rows))
            blob = luo_session.encode_luo_fdt(self.number + 1, self.header,
                                              self.flb_header if flb else None)
            self.k.write(self.fdt, blob.ljust(PAGE_SIZE, b"\0"))
            self._publish(self.fdt, len(blob))
        except (LiveUpdateError, AbiError):
            self._release_serialized()
            raise

    # -- reports --------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {
            "generation": str(self.gen), "luo": self.k.image.luo,
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
            "pending_incoming": len(self._incoming_raw or []),
            "flbs": [{"name": f.ops.name, "count": f.count} for f in self.flbs.flbs],
        }
