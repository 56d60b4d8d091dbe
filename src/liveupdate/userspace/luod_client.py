"""``luod_client``: a workload that keeps memfds across live updates through luod (a userspace
program of the emulated machine, or of a real host; tests and people use it).

    python -m liveupdate.userspace.luod_client hold NAME TOKEN:SIZE ... [--fault KIND]
    python -m liveupdate.userspace.luod_client restore NAME TOKEN ...

``hold`` starts a daemon that connects to luod as NAME, fills each memfd with a pattern
derived from (NAME, TOKEN), preserves them when luod says ``prepare`` and writes a last marker
when it says ``freeze``; it prints one JSON line (each memfd's digest) once it is registered
and returns, leaving the daemon to live until the kexec ends it. ``--fault`` misbehaves on
purpose: ``die-in-prepare`` exits inside prepare, ``no-prepare-ack`` and ``no-freeze-ack`` never
acknowledge; ``--sparse`` leaves the memfds unwritten (to preserve more than RAM).
``restore`` (in the next kernel) connects as NAME, retrieves each token, prints its digest and
marker as JSON, and tells luod it is done.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import threading

from liveupdate.client.backends import Backend, open_backend
from liveupdate.client.luod import LuodClient, connect
from liveupdate.errors import LiveUpdateError

MARKER_AT = 4096
MARKER = b"FROZEN"


def marker_at(size: int) -> int:
    """Where the freeze marker goes: past the first page, or at 0 in a memfd too small for
    that (the stateful model found holders of one page failing their freeze)."""
    return MARKER_AT if size >= MARKER_AT + len(MARKER) else 0


def pattern(name: str, token: int, size: int) -> bytes:
    seed = hashlib.blake2b(f"{name}/{token}".encode(), digest_size=64).digest()
    return (seed * (size // len(seed) + 1))[:size]


def digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def _read(backend: Backend, fd: int, size: int) -> bytes:
    m = backend.map(fd, size)
    try:
        return bytes(m.view)
    finally:
        m.close()


def hold(name: str, specs: list[tuple[int, int]], fault: str, ready: int,
         sparse: bool = False) -> None:
    backend = open_backend()
    fds: dict[int, int] = {}
    for token, size in specs:
        fd = backend.memfd_create(f"{name}-{token:x}")
        backend.ftruncate(fd, size)
        if not sparse:  # sparse: holes only, until preserving allocates them all
            m = backend.map(fd, size)
            m.view[:size] = pattern(name, token, size)
            m.close()
        fds[token] = fd

    def prepare(c: LuodClient) -> None:
        if fault == "die-in-prepare":
            os._exit(3)
        if fault == "no-prepare-ack":
            threading.Event().wait()  # never returns: no acknowledgement
        for token, fd in fds.items():
            c.preserve(fd, token)

    def freeze(c: LuodClient) -> None:
        for token, fd in fds.items():  # the last write before the pause is carried over
            size = dict(specs)[token]
            m = backend.map(fd, size)
            at = marker_at(size)
            m.view[at : at + len(MARKER)] = MARKER
            m.close()
        if fault == "no-freeze-ack":
            threading.Event().wait()  # never returns: no acknowledgement

    client = connect(name, backend=backend, on_prepare=prepare, on_freeze=freeze)
    report = {"name": name, "generation": client.generation, "pid": os.getpid(),
              "memfds": {f"{t:#x}": None if sparse else digest(pattern(name, t, s))
                         for t, s in specs}}  # (a sparse memfd holds no pattern)
    os.write(ready, (json.dumps(report) + "\n").encode())
    os.close(ready)
    client.gone.wait()  # until luod is lost for good (the kexec ends this process first)


def restore(name: str, tokens: list[int]) -> dict[str, object]:
    backend = open_backend()
    client = LuodClient(name, backend=backend)
    out: dict[str, object] = {"name": name, "restore": client.restore, "memfds": {}}
    got: dict[str, object] = {}
    for token in tokens:
        try:
            fd = client.retrieve(token)
        except LiveUpdateError as e:
            got[f"{token:#x}"] = {"errno": e.errno_name}
            continue
        size = backend.size(fd)
        data = bytearray(_read(backend, fd, size))
        at = marker_at(size)
        marker = bytes(data[at : at + len(MARKER)]).decode(errors="replace")
        data[at : at + len(MARKER)] = pattern(name, token, size)[at : at + len(MARKER)]
        got[f"{token:#x}"] = {"digest": digest(bytes(data)), "marker": marker, "size": size}
    out["memfds"] = got
    client.done()
    client.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="luod_client", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="action", required=True)
    h = sub.add_parser("hold")
    h.add_argument("name")
    h.add_argument("memfds", nargs="+", help="TOKEN:SIZE (token 0x.. or decimal, bytes)")
    h.add_argument("--fault", choices=("none", "die-in-prepare", "no-prepare-ack",
                                       "no-freeze-ack"),
                   default="none")
    h.add_argument("--sparse", action="store_true",
                   help="leave the memfds as holes (preserving allocates them: a memfd larger "
                        "than RAM makes PRESERVE_FD fail with ENOMEM)")
    r = sub.add_parser("restore")
    r.add_argument("name")
    r.add_argument("tokens", nargs="+")
    for p in (h, r):
        p.add_argument("--user", type=int, default=None, metavar="UID",
                       help="run as this uid (and gid) once started: luod sees that uid")
    args = ap.parse_args(argv)
    if args.user is not None:  # after every import: the uid may not read the installation
        os.setgid(args.user)
        os.setuid(args.user)
    try:
        if args.action == "restore":
            print(json.dumps(restore(args.name, [int(t, 0) for t in args.tokens])))
            return 0
        specs = [(int(t, 0), int(s, 0)) for t, s in (m.split(":") for m in args.memfds)]
        if any(size < len(MARKER) for _, size in specs):
            raise ValueError(f"memfds hold at least {len(MARKER)} bytes (the freeze marker)")
    except (LiveUpdateError, ValueError) as e:
        print(f"luod_client: {e}", file=sys.stderr)
        return 1
    rd, wr = os.pipe()
    if os.fork():  # the parent reports readiness and returns; the daemon holds on
        os.close(wr)
        with os.fdopen(rd) as f:
            line = f.readline()
        if not line:
            print("luod_client: the daemon failed to register", file=sys.stderr)
            return 1
        sys.stdout.write(line)
        return 0
    os.close(rd)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    try:
        hold(args.name, specs, args.fault, wr, args.sparse)
    except (LiveUpdateError, OSError):
        os._exit(1)
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
