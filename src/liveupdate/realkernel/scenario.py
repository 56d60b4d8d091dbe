"""The capture scenario: memfds of chosen shapes, preserved in LUO sessions across a kexec.

Runs inside the real kernel through the project's own client library (``LiveUpdate`` over
``RealBackend``: real ioctls on ``/dev/liveupdate``). Stage 1 creates the files of
:data:`FILES`, records what it sees of each (size, position, seals, the pages that hold data,
sha256 of the whole contents) in ``stage1.json``, copies debugfs ``kho/`` and returns; the
process keeps every session fd open through the kexec that :mod:`.guest` starts. Stage 2
retrieves the same sessions and tokens, records the same view in ``stage2.json`` -- the
second stage's view that inspectors are checked against -- copies debugfs and
``setup_data``, and finishes the sessions.

The shapes cover what memfd_luo.c treats differently (read in 7.3.4 ``mm/memfd_luo.c``):
holes (``memfd_luo_preserve_folios`` pins with ``memfd_pin_folios``, which allocates a
folio for every index, and zeroes the ones never written: a sparse memfd comes back whole,
its holes as zero pages -- seen in a capture: 1024 folios for 877 written pages), a partial
last page, a non-zero position (``ser->pos``), seals out of ``MEMFD_LUO_ALL_SEALS``, an
empty file (``nr_folios == 0``).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from liveupdate.abi.consts import PAGE_SIZE as PAGE

# session -> [(token, size, pages written (None: all), position, seals)]
FILES: dict[str, list[tuple[int, int, list[int] | None, int, int]]] = {
    "vm-0": [(0x1000, 4 << 20, [p for p in range(1024) if p % 7], 12345, 0),
             (0x1001, PAGE + 100, None, 0,
              fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
              | fcntl.F_SEAL_SEAL)],
    "cache": [(7, 0, [], 0, 0),
              (8, 2 << 20, [0, 1, 2, 500, 511], 2 << 20, fcntl.F_SEAL_GROW)],
}

Dumper = Callable[[Path], None]


def fill(token: int, page: int) -> bytes:
    """Content no page of another file or index shares: a failed or misplaced page shows."""
    head = f"token {token:#x} page {page}\n".encode()
    return (head * (PAGE // len(head) + 1))[:PAGE]


def view(fd: int) -> dict[str, Any]:
    """What userspace can see of a memfd, without moving its position."""
    size = os.fstat(fd).st_size
    pos = os.lseek(fd, 0, os.SEEK_CUR)
    digest, present = hashlib.sha256(), []
    off = 0
    while off < size:
        chunk = os.pread(fd, min(1 << 20, size - off), off)
        digest.update(chunk)
        for i in range(0, len(chunk), PAGE):
            if any(chunk[i:i + PAGE]):
                present.append((off + i) // PAGE)
        off += len(chunk)
    return {"size": size, "pos": pos, "seals": fcntl.fcntl(fd, fcntl.F_GET_SEALS),
            "sha256": digest.hexdigest(), "nonzero_pages": present}


def make(token: int, size: int, pages: list[int] | None, pos: int, seals: int) -> int:
    fd = os.memfd_create(f"lu-{token:#x}", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    for p in range((size + PAGE - 1) // PAGE) if pages is None else pages:
        os.pwrite(fd, fill(token, p)[: size - p * PAGE], p * PAGE)
    os.lseek(fd, pos, os.SEEK_SET)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


_held: list[object] = []  # stage 1's sessions and fds stay open until the kexec


def run(stage: int, out: Path, debugfs: Path, dump_debugfs: Dumper,
        dump_setup_data: Dumper) -> int:
    from liveupdate.client.device import LiveUpdate

    lu = LiveUpdate()
    seen: dict[str, dict[str, Any]] = {}
    if stage == 1:
        for name, files in FILES.items():
            s = lu.create_session(name)
            _held.append(s)
            for token, size, pages, pos, seals in files:
                fd = make(token, size, pages, pos, seals)
                s.preserve_fd(fd, token)
                _held.append(fd)
                seen.setdefault(name, {})[f"{token:#x}"] = view(fd)
        (out / "stage1.json").write_text(json.dumps(seen, indent=1) + "\n")
        dump_debugfs(out / "debugfs-stage1")
        return 0
    sessions = []
    for name, files in FILES.items():
        s = lu.retrieve_session(name)
        sessions.append(s)
        for token, *_ in files:
            fd = s.retrieve_fd(token)
            seen.setdefault(name, {})[f"{token:#x}"] = view(fd)
            os.close(fd)
    (out / "stage2.json").write_text(json.dumps(seen, indent=1) + "\n")
    dump_debugfs(out / "debugfs-stage2")
    dump_setup_data(out / "setup_data")
    for s in sessions:
        s.finish()
        s.close()
    first = json.loads((out / "stage1.json").read_text())
    return 0 if first == seen else 1
