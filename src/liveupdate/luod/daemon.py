"""The live update daemon.

luod is the only opener of /dev/liveupdate. Clients (VMMs, caches) connect to its socket, say
who they are (uid from SO_PEERCRED, plus a name: the pair is the client, unique, and keeps
its identity across the kexec) and hand over what must survive. An update walks everyone
through one state machine (:mod:`liveupdate.luod.state`):

1. **load** -- decide, before anyone pauses, what the update will do: ``native``,
   ``negotiated`` (the kernel runs with ``liveupdate_negotiate=on``: which formats) or
   refused, saying what Linux would do (the image header names its formats; the format table
   decides); then ``kexec_file_load``. With negotiation, the image is loaded again after
   prepare, so the kernel checks what was actually preserved while the VMs still run.
2. **prepare** -- every client is told ``prepare`` and must acknowledge in time. On 6.19+
   (as Google's luo-agent does) luod creates one session per client and hands it over; the
   client preserves its own fds into it. On v3 tokens are global and only luod has the
   device, so clients send their fds to luod, which preserves them under global tokens it
   maps from (client, client token) -- then luod preserves its registry and sends
   ``SET_EVENT(PREPARE)``.
3. **freeze** -- clients pause and acknowledge; luod writes the final registry and calls
   ``reboot(LINUX_REBOOT_CMD_KEXEC)``.
4. **updated** -- the next kernel's luod finds its registry through LUO (never on disk),
   hands each returning client exactly its own resources, and FINISHes when every client
   is done, or after a timeout, reporting and reclaiming what nobody claimed.

A client that does not acknowledge in time, dies before acknowledging, or a failing load,
prepare or reboot cancels the update: clients are told ``cancel`` (and resume), v3 gets
``SET_EVENT(CANCEL)`` and its tokens unpreserved, 6.19 sessions are closed (there is no
CANCEL in that uAPI). Every failure is one line in ``status``.

Each client's tokens live in its own namespace: a client asking for a token it did not
preserve gets ENOENT, never another client's file. Admin requests (load, update, cancel)
need uid 0; which uids may be clients at all is the ``allow_uids`` policy.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from liveupdate.abi import formats, generations, image
from liveupdate.abi.uapi import Event as KEvent
from liveupdate.abi.uapi import Gen, State
from liveupdate.client.backends import Backend
from liveupdate.client.device import LiveUpdate, Session
from liveupdate.client.generation import kernel_generation
from liveupdate.client.mapping import Mapping
from liveupdate.errors import AbiError, LiveUpdateError
from liveupdate.ipc import endpoints, framing
from liveupdate.kernel.cmdline import Cmdline  # the Linux command line's own parsing rules
from liveupdate.luod import registry
from liveupdate.luod.state import Event, Phase, next_phase

REGISTRY_TOKEN = 0x4C554F44_00000000  # "LUOD": v3 tokens are global
CLIENT_TOKEN_BASE = 0x4C554F44_00000001
OWN_SESSION = "luod"
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
NEGOTIATE = "liveupdate_negotiate"  # the kernel flag of kernel/negotiate.py


@dataclass(eq=False)
class Conn:
    sock: socket.socket
    uid: int
    pid: int
    name: str = ""
    acks: set[str] = field(default_factory=set)
    refused: dict[str, str] = field(default_factory=dict)  # event -> the client's reason
    alive: bool = True
    admin: bool = False  # luoctl: watches and commands, holds nothing
    send_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def key(self) -> tuple[int, str]:
        return (self.uid, self.name)

    def send(self, msg: dict[str, Any], fds: tuple[int, ...] = ()) -> None:
        with self.send_lock:
            try:
                framing.send(self.sock, msg, fds)
            except OSError:
                self.alive = False


@dataclass(frozen=True)
class Quota:
    """Per client, for one update: preserved files and bytes (0: no limit)."""

    files: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class Timeouts:
    prepare: float = 10.0
    freeze: float = 10.0
    finish: float = 60.0


def _err(e: LiveUpdateError) -> dict[str, Any]:
    return {"ok": False, "errno": e.errno_name, "error": e.message}


class Luod:
    def __init__(self, backend: Backend, path: str, *, allow_uids: frozenset[int],
                 timeouts: Timeouts = Timeouts(), mode: int = 0o600,
                 quota: Quota = Quota()) -> None:
        self.backend = backend
        self.path = path
        self.allow = allow_uids | {0}
        self.timeouts = timeouts
        self.mode = mode
        self.dev = LiveUpdate(backend)  # EBUSY when another luod has the device
        self.gen = self.dev.gen
        self.boot_id = backend.boot_id()
        self.quota = quota
        # luod preserves and retrieves for its clients (v3 always; 6.19+ when quotas are set,
        # since a client holding its own session fd could preserve past any quota)
        self.mediated = self.gen is Gen.V3 or bool(quota.files or quota.bytes)
        self.usage: dict[tuple[int, str], tuple[int, int]] = {}  # files, bytes this update
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.phase = Phase.NORMAL
        self.busy = ""  # the running operation (load, update, finish)
        self.last_error = ""
        self.loaded: dict[str, Any] | None = None
        self.reg = registry.Registry(str(self.gen))
        self.conns: dict[tuple[int, str], Conn] = {}  # clients, by (uid, name)
        self.admins: list[Conn] = []
        self.records: dict[tuple[int, str], registry.ClientRecord] = {}
        self.done: set[tuple[int, str]] = set()
        self.out_sessions: dict[tuple[int, str], Session] = {}
        self.in_sessions: dict[tuple[int, str], Session] = {}
        self.own: Session | None = None
        self.reports: list[dict[str, Any]] = []
        self.reg_fd, self.reg_map = self._registry_memfd()
        self.server: socket.socket | None = None

    # -- the registry memfd ---------------------------------------------------------------
    def _registry_memfd(self) -> tuple[int, Mapping]:
        fd = self.backend.memfd_create("luod-registry")
        self.backend.ftruncate(fd, registry.SIZE)
        return fd, self.backend.map(fd, registry.SIZE)

    def _write_registry(self) -> None:
        self.reg.clients = list(self.records.values())
        self.reg_map.view[: registry.SIZE] = self.reg.encode()

    def _adopt_registry(self, fd: int) -> None:
        m = self.backend.map(fd, registry.SIZE)
        try:
            self.reg = registry.decode(bytes(m.view))
        except AbiError as e:
            self.last_error = f"the previous luod's registry is unreadable ({e.message}); " \
                              "unclaimed resources are reclaimed at FINISH"
            self.reg = registry.Registry(str(self.gen))
        finally:
            m.close()
            os.close(fd)
        self.records = {(c.uid, c.name): c for c in self.reg.clients}

    # -- start ----------------------------------------------------------------------------
    def recover(self) -> None:
        """What the kernel says about the last update: UPDATED means a previous luod's
        registry crossed the kexec; otherwise a fresh start (a previous luod that died
        mid-update left the kernel cancelling, and its state file says why)."""
        updated = False
        if self.gen is Gen.V3:
            if self.dev.get_state() is State.UPDATED:
                self._adopt_registry(self.dev.fd_restore(REGISTRY_TOKEN))
                updated = True
        else:
            try:
                own = self.dev.retrieve_session(OWN_SESSION)
            except LiveUpdateError as e:
                if e.errno != errno.ENOENT:
                    raise
            else:
                self.own = own
                self._adopt_registry(own.retrieve_fd(0))
                updated = True
                for key, rec in self.records.items():
                    if rec.session:
                        try:
                            self.in_sessions[key] = self.dev.retrieve_session(rec.session)
                        except LiveUpdateError as err:
                            self.last_error = f"session {rec.session}: {err.message}"
        previous = self._read_state_file()
        if updated:
            self.phase = Phase.UPDATED
            self.reg.timeline["updated"] = time.time()
            threading.Thread(target=self._finish_after_timeout, daemon=True).start()
        elif previous.get("phase") in ("prepared", "frozen"):
            self.last_error = (f"the previous luod ended while {previous['phase']}; the "
                               "kernel cancelled the update and every client resumed")
        elif previous.get("phase") == "updated":
            self.last_error = ("the previous luod ended before FINISH; closing its sessions "
                               "finished them: what clients had retrieved is theirs, the "
                               "rest was freed")
        self._save_state()

    def _state_file(self) -> str:
        return self.path + ".state"

    def _read_state_file(self) -> dict[str, Any]:
        """A previous luod's state in *this* boot (like /run, it means nothing to a later
        boot: after a kexec the registry says what happened, after a power loss nothing)."""
        try:
            with open(self._state_file()) as f:
                d = json.load(f)
        except (OSError, ValueError):
            return {}
        return d if isinstance(d, dict) and d.get("boot_id") == self.boot_id else {}

    def _save_state(self) -> None:
        """Runtime state for a luod restarted by init (``/run``-like, not the registry)."""
        tmp = self._state_file() + ".tmp"
        try:
            os.makedirs(os.path.dirname(tmp) or ".", exist_ok=True)
            with open(tmp, "w") as f:
                json.dump({"phase": self.phase.value, "error": self.last_error,
                           "boot_id": self.boot_id}, f)
            os.replace(tmp, self._state_file())
        except OSError as e:  # only a restarted luod's explanation is lost
            print(f"luod: cannot save {self._state_file()}: {e.strerror}", flush=True)

    def listen(self) -> socket.socket:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        if os.path.exists(self.path):
            os.unlink(self.path)  # a stale socket of a previous luod (we have the device)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.bind(self.path)
        os.chmod(self.path, self.mode)
        s.listen(64)
        self.server = s
        return s

    def serve_forever(self) -> None:
        assert self.server is not None
        starved = False
        while True:
            try:
                sock, _ = self.server.accept()
                if starved:
                    print("luod: accepting connections again", flush=True)
                starved = False
            except OSError as e:
                if e.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    return  # the listening socket is gone: luod is shutting down
                # out of fds or memory: the connection waits in the backlog; keep serving the
                # connected clients and try again shortly instead of dying (init would restart
                # a luod that forgot its update)
                if not starved:
                    print(f"luod: accept: {e.strerror}; retrying", flush=True)
                starved = True
                time.sleep(0.1)
                continue
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            pid, uid, _gid = (int.from_bytes(creds[i : i + 4], "little") for i in (0, 4, 8))
            threading.Thread(target=self._serve, args=(Conn(sock, uid, pid),),
                             daemon=True).start()

    # -- one connection -------------------------------------------------------------------
    def _serve(self, c: Conn) -> None:
        try:
            while True:
                try:
                    got = framing.recv(c.sock)
                except LiveUpdateError as e:
                    c.send({"ok": False, "errno": e.errno_name, "error": e.message})
                    continue
                except OSError:
                    got = None
                if got is None:
                    return
                msg, fds = got
                try:
                    reply, out = self._handle(c, msg, fds)
                    reply = {"id": msg.get("id"), "ok": True, **reply}
                except LiveUpdateError as e:
                    reply, out = {"id": msg.get("id"), **_err(e)}, []
                finally:
                    for fd in fds:
                        os.close(fd)
                if msg.get("op") != "ack":
                    c.send(reply, tuple(out))
                for fd in out:
                    os.close(fd)
                if not c.name and not reply["ok"]:
                    return  # a refused hello ends the connection
        finally:
            c.alive = False
            c.sock.close()
            with self.cond:
                if self.conns.get(c.key) is c:
                    del self.conns[c.key]
                if c in self.admins:
                    self.admins.remove(c)
                self.cond.notify_all()

    def _handle(self, c: Conn, msg: dict[str, Any], fds: list[int]
                ) -> tuple[dict[str, Any], list[int]]:
        op = framing.field(msg, "op", str)
        if not c.name:
            if op != "hello":
                raise LiveUpdateError(err=errno.EPROTO, msg="say hello first")
            return self._hello(c, msg)
        handler = {"ack": self._ack, "preserve": self._preserve, "retrieve": self._retrieve,
                   "done": self._done, "status": self._status, "sessions": self._sessions,
                   "load": self._load, "update": self._update, "cancel": self._cancel,
                   "wait": self._wait}.get(op)
        if handler is None:
            raise LiveUpdateError(err=errno.EOPNOTSUPP, msg=f"luod: unknown op {op!r}")
        if op in ("load", "update", "cancel") and c.uid != 0:
            raise LiveUpdateError(err=errno.EPERM, msg=f"{op} needs uid 0")
        return handler(c, msg, fds)

    def _hello(self, c: Conn, msg: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        if framing.field(msg, "v", int) != endpoints.LUOD_VERSION:
            raise LiveUpdateError(err=errno.EPROTO, msg=f"luod speaks protocol "
                                  f"{endpoints.LUOD_VERSION}")
        name = framing.field(msg, "name", str)
        if not 0 < len(name) <= 40 or not set(name) <= NAME_CHARS:
            raise LiveUpdateError(err=errno.EINVAL, msg="client names are 1-40 characters "
                                  "of letters, digits, '.', '_', '-'")
        if c.uid not in self.allow:
            raise LiveUpdateError(err=errno.EPERM, msg=f"uid {c.uid} is not allowed by "
                                  "luod's policy")
        if msg.get("role", "client") == "admin":
            c.name, c.admin = name, True
            with self.cond:
                self.admins.append(c)
            return {"v": endpoints.LUOD_VERSION, "generation": str(self.gen),
                    "phase": self.phase.value, "restore": False}, []
        with self.cond:
            if (c.uid, name) in self.conns:
                raise LiveUpdateError(err=errno.EBUSY, msg=f"client {name!r} of uid {c.uid} "
                                      "is already connected")
            c.name = name
            self.conns[c.key] = c
            rec = self.records.get(c.key)
            reply: dict[str, Any] = {"v": endpoints.LUOD_VERSION, "generation": str(self.gen),
                                     "phase": self.phase.value, "restore": False}
            out: list[int] = []
            if self.phase is Phase.UPDATED and rec is not None:
                reply["restore"] = True
                if self.gen is Gen.V3:
                    reply["tokens"] = sorted(rec.tokens)
                elif c.key in self.in_sessions and not self.mediated:
                    out.append(os.dup(self.in_sessions[c.key].fd))
            reply["mediated"] = self.mediated
            return reply, out

    def _ack(self, c: Conn, msg: dict[str, Any], fds: list[int]
             ) -> tuple[dict[str, Any], list[int]]:
        """An acknowledgement -- or, with ``error``, the client's refusal of the event (its
        callback failed): the barrier fails at once with the client's reason."""
        event = framing.field(msg, "event", str)
        error = msg.get("error")
        with self.cond:
            if error is not None:
                c.refused[event] = str(error)[:200].replace("\n", " ")
            else:
                c.acks.add(event)
            self.cond.notify_all()
        return {}, []

    def _record(self, c: Conn) -> registry.ClientRecord:
        return self.records.setdefault(c.key, registry.ClientRecord(c.uid, c.name))

    def _charge(self, c: Conn, size: int) -> tuple[int, int]:
        """The client's usage with one more file of ``size`` bytes; EDQUOT past its quota."""
        files, nbytes = self.usage.get(c.key, (0, 0))
        files, nbytes = files + 1, nbytes + size
        if self.quota.files and files > self.quota.files:
            raise LiveUpdateError(err=errno.EDQUOT, msg=f"{c.name}: quota of "
                                  f"{self.quota.files} preserved files reached")
        if self.quota.bytes and nbytes > self.quota.bytes:
            raise LiveUpdateError(err=errno.EDQUOT, msg=f"{c.name}: {nbytes} bytes would pass "
                                  f"the quota of {self.quota.bytes}")
        return files, nbytes

    def _preserve(self, c: Conn, msg: dict[str, Any], fds: list[int]
                  ) -> tuple[dict[str, Any], list[int]]:
        if not self.mediated:
            raise LiveUpdateError(err=errno.EOPNOTSUPP, msg="on 6.19+ clients preserve into "
                                  "their own session")
        token = framing.field(msg, "token", int)
        if len(fds) != 1:
            raise LiveUpdateError(err=errno.EBADF, msg="preserve takes exactly one fd")
        size = self.backend.size(fds[0])
        with self.cond:
            if self.gen is Gen.V3:
                if self.phase not in (Phase.NORMAL, Phase.UPDATED) and self.busy != "prepare":
                    raise LiveUpdateError(err=errno.EBUSY, msg=f"luod is {self.phase.value}")
            elif self.busy != "prepare" or c.key not in self.out_sessions:
                raise LiveUpdateError(err=errno.EBUSY, msg="preserve inside prepare")
            rec = self._record(c)
            if token in rec.tokens:
                raise LiveUpdateError(err=errno.EEXIST, msg=f"token {token:#x} is yours "
                                      "already")
            usage = self._charge(c, size)
            if self.gen is Gen.V3:
                glob = 1 + max([CLIENT_TOKEN_BASE - 1, *(g for r in self.records.values()
                                                         for g in r.tokens.values())])
                self.dev.fd_preserve(fds[0], glob)
            else:
                self.out_sessions[c.key].preserve_fd(fds[0], token)
                glob = token
            rec.tokens[token] = glob
            self.usage[c.key] = usage
        return {"token": token}, []

    def _retrieve(self, c: Conn, msg: dict[str, Any], fds: list[int]
                  ) -> tuple[dict[str, Any], list[int]]:
        if not self.mediated:
            raise LiveUpdateError(err=errno.EOPNOTSUPP, msg="on 6.19+ clients retrieve from "
                                  "the session luod handed them")
        token = framing.field(msg, "token", int)
        if self.gen is not Gen.V3:
            with self.cond:
                session = self.in_sessions.get(c.key)
                if self.phase is not Phase.UPDATED or session is None:
                    raise LiveUpdateError(err=errno.ENOENT, msg=f"{c.name} has nothing from "
                                          "the previous kernel")
                return {"token": token}, [session.retrieve_fd(token)]
        with self.cond:
            rec = self.records.get(c.key)
            if self.phase is not Phase.UPDATED or rec is None or token not in rec.tokens:
                raise LiveUpdateError(err=errno.ENOENT, msg=f"{c.name} has no preserved "
                                      f"token {token:#x}")
            return {"token": token}, [self.dev.fd_restore(rec.tokens[token])]

    def _done(self, c: Conn, msg: dict[str, Any], fds: list[int]
              ) -> tuple[dict[str, Any], list[int]]:
        with self.cond:
            self.done.add(c.key)
            if self.phase is Phase.UPDATED and self._waiting_for() <= self.done:
                self._finish("every client is done")
        return {"phase": self.phase.value}, []

    # -- status ---------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        with self.cond:
            return {"generation": str(self.gen), "phase": self.phase.value, "pid": os.getpid(),
                    "busy": self.busy or None, "last_error": self.last_error or None,
                    "loaded": self.loaded, "update": self.reg.update,
                    "clients": [{"uid": u, "name": n} for u, n in sorted(self.conns)],
                    "allow_uids": sorted(self.allow),
                    "reports": self.reports[-5:]}

    def _status(self, c: Conn, msg: dict[str, Any], fds: list[int]
                ) -> tuple[dict[str, Any], list[int]]:
        return self.status(), []

    def _sessions(self, c: Conn, msg: dict[str, Any], fds: list[int]
                  ) -> tuple[dict[str, Any], list[int]]:
        with self.cond:
            own = c.uid == 0
            return {"clients": [
                {"uid": r.uid, "name": r.name, "session": r.session or None,
                 "tokens": {f"{k:#x}": f"{v:#x}" for k, v in r.tokens.items()},
                 "done": (r.uid, r.name) in self.done}
                for r in self.records.values() if own or (r.uid, r.name) == c.key]}, []

    def _wait(self, c: Conn, msg: dict[str, Any], fds: list[int]
              ) -> tuple[dict[str, Any], list[int]]:
        """Block until luod is NORMAL and idle (``luoctl update`` after the kexec)."""
        timeout = msg.get("timeout", 120)
        if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout < 0:
            raise LiveUpdateError(err=errno.EINVAL, msg="wait: timeout must be seconds")
        with self.cond:
            if not self.cond.wait_for(lambda: self.phase is Phase.NORMAL and not self.busy,
                                      timeout):
                raise LiveUpdateError(err=errno.ETIMEDOUT, msg=f"luod is still "
                                      f"{self.phase.value} after {timeout}s")
        return self.status(), []

    # -- load -----------------------------------------------------------------------------
    def _preflight(self, path: str, release: str | None, line: str) -> dict[str, Any]:
        """What the update will do, decided before anyone pauses: the next kernel's
        generation (its image header; a real bzImage names none, so the caller gives its
        release -- with Linux's own warning that nothing is guaranteed) and the handover:
        ``native`` (every format matches), ``negotiated`` (this kernel runs with
        ``liveupdate_negotiate=on`` and both agree on older formats: which), or EINVAL with
        the reason and what Linux would do (cold boot, panic, EIO, unreachable)."""
        try:
            with open(path, "rb") as f:
                head = f.read(4096)
        except OSError as e:
            raise LiveUpdateError(err=e.errno or errno.ENOENT, msg=f"{path}: {e.strerror}") \
                from e
        try:
            nxt = image.decode(head)
        except AbiError:
            if release is None:
                raise LiveUpdateError(err=errno.EINVAL, msg=f"{path} names no LUO generation:"
                                      " give the next kernel's release (--release)") from None
            nxt = image.KernelImage.of(kernel_generation(release))
        this = image.KernelImage.of(kernel_generation(self.backend.uname()))
        theirs = nxt.reads_for(Cmdline.parse(line).flag(NEGOTIATE))
        written = this.native()
        if Cmdline.parse(self._cmdline()).flag(NEGOTIATE):
            try:
                agreed = generations.agree(written, this.capable(), theirs)
            except AbiError as e:
                raise LiveUpdateError(err=errno.EINVAL, msg=f"negotiation with the next "
                                      f"kernel ({nxt.release}): {e.message}") from e
            missing = [c for c in ("luo", "memfd") if c not in agreed]
            if missing:
                raise LiveUpdateError(err=errno.EINVAL, msg=f"negotiation with the next "
                                      f"kernel ({nxt.release}): no common {missing[0]} format "
                                      "-- the clients' files could not cross")
            handover: dict[str, Any] = {
                "mode": generations.mode(agreed, written, nxt.native()), "formats": agreed}
        else:
            bad = formats.incompatibilities(written, theirs)
            if bad:
                raise LiveUpdateError(err=errno.EINVAL, msg=f"the next kernel ({nxt.release},"
                                      f" LUO {nxt.luo}) cannot take this handover: "
                                      f"{formats.describe(bad)} -- Linux would "
                                      f"{bad[0].effect}")
            handover = {"mode": "native", "formats": written}
        return {"generation": nxt.luo, "handover": handover}

    def load(self, path: str, cmdline: str | None, release: str | None) -> dict[str, Any]:
        line = cmdline if cmdline is not None else self._cmdline()
        plan = self._preflight(path, release, line)
        self.backend.kexec_file_load(path, line)
        self.loaded = {"image": path, **plan, "cmdline": line,
                       **({"warning": "Linux guarantees no live update across versions"}
                          if release else {})}
        return self.loaded

    def _recheck(self) -> None:
        """After prepare, with every file preserved: load the image again, so that a kernel
        that negotiates checks what is actually preserved (a sealed memfd for memfd-v1)
        while the VMs still run -- not in reboot(), after they paused."""
        if self.loaded is None or self.loaded["handover"]["mode"] != "negotiated":
            return
        try:
            self.backend.kexec_file_load(self.loaded["image"], self.loaded["cmdline"])
        except LiveUpdateError as e:
            raise LiveUpdateError(err=e.errno, msg=f"the preserved files cannot cross: "
                                  f"{e.message}") from e

    def _cmdline(self) -> str:
        return self.backend.cmdline()

    @contextlib.contextmanager
    def _claim(self, what: str) -> Iterator[None]:
        """Run ``what`` (a load or an update) alone, from NORMAL; EBUSY otherwise."""
        with self.cond:
            if self.phase is not Phase.NORMAL or self.busy:
                raise LiveUpdateError(err=errno.EBUSY,
                                      msg=f"luod is {self.busy or self.phase.value}")
            self.busy = what
        try:
            yield
        finally:
            with self.cond:
                self.busy = ""
                self.cond.notify_all()

    def _load(self, c: Conn, msg: dict[str, Any], fds: list[int]
              ) -> tuple[dict[str, Any], list[int]]:
        with self._claim("load"):
            try:
                return self.load(framing.field(msg, "image", str), msg.get("cmdline"),
                                 msg.get("release")), []
            except LiveUpdateError as e:
                self.last_error = f"load: {e.message}"
                raise

    # -- the update -----------------------------------------------------------------------
    def _set_phase(self, event: Event) -> None:
        self.phase = next_phase(self.phase, event)
        now = time.time()
        self.reg.timeline[self.phase.value] = now
        self._save_state()  # before anyone hears of it: a luod killed now is explained
        print(f"luod: {event.value}: {self.phase.value}", flush=True)
        self.cond.notify_all()
        for a in list(self.admins):  # progress for luoctl
            a.send({"event": "phase", "phase": self.phase.value, "time": now,
                    "start": self.reg.timeline.get("start", now)})

    def _barrier(self, event: str, timeout: float) -> None:
        """Every connected client acknowledges ``event`` within ``timeout``; a client that
        dies (EPIPE) or stays silent (ETIMEDOUT) fails it, named."""
        deadline = time.monotonic() + timeout
        for c in list(self.conns.values()):
            def answered(c: Conn = c) -> bool:
                return event in c.acks or event in c.refused or not c.alive

            if not self.cond.wait_for(answered, max(0.0, deadline - time.monotonic())):
                raise LiveUpdateError(err=errno.ETIMEDOUT, msg=f"client {c.name} did not "
                                      f"acknowledge {event} in {timeout}s")
            if event in c.refused:
                raise LiveUpdateError(err=errno.ECANCELED, msg=f"client {c.name} failed "
                                      f"{event}: {c.refused.pop(event)}")
            if event not in c.acks:
                raise LiveUpdateError(err=errno.EPIPE, msg=f"client {c.name} went away "
                                      f"during {event}")

    def _update(self, c: Conn, msg: dict[str, Any], fds: list[int]
                ) -> tuple[dict[str, Any], list[int]]:
        with self._claim("update"):
            try:
                started = time.time()
                if msg.get("image") is not None:
                    self.load(framing.field(msg, "image", str), msg.get("cmdline"),
                              msg.get("release"))
                if self.loaded is None:
                    raise LiveUpdateError(err=errno.EINVAL, msg="no next kernel loaded")
                with self.cond:
                    self.last_error = ""
                    self.reg.timeline = {"start": started}
                    self._prepare()
                    self._recheck()
                    self._freeze()
                    self.reg.update += 1
                    self.reg.timeline["reboot"] = time.time()
                    self._write_registry()
                    self.cond.notify_all()
                self.backend.reboot_kexec()  # on success this process ends here
                raise LiveUpdateError(err=errno.EIO, msg="reboot(KEXEC) returned")
            except LiveUpdateError as e:
                with self.cond:
                    self._cancel_update(e.message)
                raise

    def _holds(self, rec: registry.ClientRecord) -> bool:
        return bool(rec.tokens or rec.session)

    def _prepare(self) -> None:
        # a client that left holding nothing is forgotten: the next kernel must not wait
        self.records = {k: r for k, r in self.records.items()
                        if k in self.conns or self._holds(r)}
        self._set_phase(Event.PREPARE)
        self.busy = "prepare"
        if self.gen is not Gen.V3:
            self.usage = {}
        for c in list(self.conns.values()):
            c.acks.clear()
            out: tuple[int, ...] = ()
            if self.gen is not Gen.V3:
                name = f"{c.uid}:{c.name}"
                self.out_sessions[c.key] = self.dev.create_session(name)
                self._record(c).session = name
                if not self.mediated:
                    out = (self.out_sessions[c.key].fd,)
            c.send({"event": "prepare", "mediated": self.mediated}, out)
        self._barrier("prepare", self.timeouts.prepare)
        self._write_registry()
        if self.gen is Gen.V3:
            self.dev.fd_preserve(self.reg_fd, REGISTRY_TOKEN)
            self.dev.set_event(KEvent.PREPARE)
        else:
            self.own = self.dev.create_session(OWN_SESSION)
            self.own.preserve_fd(self.reg_fd, 0)
        self.busy = "update"

    def _freeze(self) -> None:
        self._set_phase(Event.FREEZE)
        for c in list(self.conns.values()):
            c.send({"event": "freeze"})
        self._barrier("freeze", self.timeouts.freeze)

    def _cancel_update(self, reason: str) -> None:
        """Back to NORMAL with every client resumed and nothing left preserved."""
        self.last_error = reason
        self.usage = {}
        for c in list(self.conns.values()):
            c.send({"event": "cancel", "reason": reason})
        if self.gen is Gen.V3:
            if self.dev.get_state() in (State.PREPARED, State.FROZEN):
                self.dev.set_event(KEvent.CANCEL)
            for rec in self.records.values():
                for glob in rec.tokens.values():
                    self._unpreserve_quietly(glob)
                rec.tokens.clear()
            self._unpreserve_quietly(REGISTRY_TOKEN)
        else:
            for s in [*self.out_sessions.values(), *([self.own] if self.own else [])]:
                s.close()  # the abort path: closing a session unpreserves it
            self.out_sessions.clear()
            self.own = None
            for rec in self.records.values():
                rec.session = ""
                rec.tokens.clear()
        if self.phase in (Phase.PREPARED, Phase.FROZEN):
            self._set_phase(Event.CANCEL)
        self._save_state()

    def _unpreserve_quietly(self, token: int) -> None:
        """FD_UNPRESERVE where the token may already be gone (ENOENT is fine)."""
        try:
            self.dev.fd_unpreserve(token)
        except LiveUpdateError as e:
            if e.errno != errno.ENOENT:
                raise

    def _cancel(self, c: Conn, msg: dict[str, Any], fds: list[int]
                ) -> tuple[dict[str, Any], list[int]]:
        with self.cond:
            if self.phase not in (Phase.PREPARED, Phase.FROZEN):
                raise LiveUpdateError(err=errno.EINVAL, msg=f"nothing to cancel: luod is "
                                      f"{self.phase.value}")
            self._cancel_update("cancelled by an administrator")
        return self.status(), []

    # -- after the kexec ------------------------------------------------------------------
    def _waiting_for(self) -> set[tuple[int, str]]:
        """The clients the previous kernel's luod preserved something for."""
        return {k for k, r in self.records.items() if self._holds(r)}

    def _finish_after_timeout(self) -> None:
        with self.cond:
            if self.cond.wait_for(lambda: self.phase is not Phase.UPDATED,
                                  self.timeouts.finish):
                return
            missing = sorted(f"{n} (uid {u})" for u, n in self._waiting_for() - self.done)
            self._finish(f"timeout after {self.timeouts.finish}s; unclaimed resources of "
                         f"{', '.join(missing)} reclaimed")

    def _finish(self, why: str) -> None:
        self.usage = {}
        if self.gen is Gen.V3:
            self.dev.set_event(KEvent.FINISH)
        else:
            for s in [*self.in_sessions.values(), *([self.own] if self.own else [])]:
                s.finish()
                s.close()
            self.in_sessions.clear()
            self.own = None
        missing = self._waiting_for() - self.done
        if missing:
            self.last_error = f"FINISH: {why}"
        self.reg.timeline["normal"] = time.time()
        self.reports.append({"update": self.reg.update, "timeline": dict(self.reg.timeline),
                             "finish": why})
        self.records = {k: registry.ClientRecord(r.uid, r.name) for k, r in
                        self.records.items() if k in self.conns}
        self.done.clear()
        self._set_phase(Event.FINISH)
