"""Writing what :func:`liveupdate.tools.extract.plan` validated: all of it, or nothing.

DIR must not exist, or be an empty directory (not a symbolic link): files of an earlier
extract must not stay beside a new manifest that does not list them. Everything is written
into a fresh temporary directory beside DIR (``mkdtemp``: ours alone, so nothing in it can be
a planted symbolic link; every open is ``O_NOFOLLOW`` all the same, and the manifest
``O_EXCL``), which is renamed to DIR at the end -- ``rename(2)`` replaces DIR only if it is
still an empty directory. Any failure on the way (ENOSPC, EFBIG, EDQUOT, ...) removes the
temporary directory and is raised as a LiveUpdateError carrying the errno, so that the
report says what happened and nothing is left behind.

Each file is sized with ftruncate and only pages holding a non-zero byte are written (Linux
7.3 fills a memfd's holes with zeroed folios at preserve, ``memfd_pin_folios``, and those
stay holes here). A folio may be as large as RAM, so it is read :data:`COPY_CHUNK` bytes at
a time.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from liveupdate.abi.consts import PAGE_SIZE
from liveupdate.abi.physmem import PhysMem
from liveupdate.errors import LiveUpdateError

if TYPE_CHECKING:
    from liveupdate.tools.extract import Plan, Planned

MANIFEST = "manifest.json"
COPY_CHUNK = 8 << 20  # bytes of a folio read at once (a multiple of PAGE_SIZE)
ZEROS = bytes(1 << 20)


def check_target(out: Path) -> None:
    """DIR is absent (its parent a directory) or an empty directory; LiveUpdateError
    otherwise. Checked before anything is decoded or written."""
    try:
        st = os.lstat(out)
    except (FileNotFoundError, NotADirectoryError):
        parent = out.parent
        if not parent.is_dir():
            raise LiveUpdateError(err=errno.ENOENT if not parent.exists() else errno.ENOTDIR,
                                  msg=f"{parent}: not a directory to create {out.name} "
                                      "in") from None
        return
    if stat.S_ISLNK(st.st_mode):
        raise LiveUpdateError(err=errno.EEXIST, msg=f"{out} is a symbolic link: --extract "
                              "writes a new directory, never through a link")
    if not stat.S_ISDIR(st.st_mode):
        raise LiveUpdateError(err=errno.EEXIST, msg=f"{out} exists and is not a directory")
    with os.scandir(out) as entries:
        if next(entries, None) is not None:
            raise LiveUpdateError(err=errno.ENOTEMPTY, msg=f"{out} is not empty: --extract "
                                  "writes a new directory (files of an earlier extract would "
                                  "stay beside the new manifest)")


def write(mem: PhysMem, plan: Plan, out: Path) -> dict[str, Any]:
    """Write every planned file and the manifest into DIR, all or nothing; the manifest."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        manifest = _write_all(mem, plan, tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp made it 0700; DIR gets the usual mode
        os.rename(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        where = str(e.filename or out).replace(str(tmp), str(out), 1)
        raise LiveUpdateError(err=e.errno or errno.EIO,
                              msg=f"{where}: could not write it") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _umask() -> int:
    mask = os.umask(0o022)  # read it: os.umask is the only way, and it sets one
    os.umask(mask)
    return mask


def _write_all(mem: PhysMem, plan: Plan, tmp: Path) -> dict[str, Any]:
    entries = []
    for p in plan.files:
        path = tmp / p.relpath
        if not path.parent.is_dir():
            os.mkdir(path.parent, 0o777)
        try:
            digest, pages = _write_one(mem, p, path)
        except OSError as e:  # ftruncate and pwrite name no file: say which one
            e.filename = e.filename or str(path)
            raise
        f = p.file
        entries.append({"session": f.session, "token": f"{f.token:#x}",
                        "compatible": f.compatible, "size": f.size, "pos": f.pos,
                        "seals": f"{f.seals:#x}", "nr_folios": f.nr_folios,
                        "sha256": digest, "path": p.relpath, "data_pages": pages})
    manifest: dict[str, Any] = {"files": entries,
                                "skipped": [s.report() for s in plan.skipped]}
    if plan.note:
        manifest["note"] = plan.note
    fd = os.open(tmp / MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with open(fd, "w") as out:
        out.write(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _write_one(mem: PhysMem, p: Planned, path: Path) -> tuple[str, int]:
    """Write one file sparse; return (sha256 hex, data pages written)."""
    f, h, written, at = p.file, hashlib.sha256(), 0, 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        os.ftruncate(fd, f.size)
        for phys, order, index in zip(p.phys.tolist(), p.order.tolist(), p.index.tolist(),
                                      strict=True):
            start = index * PAGE_SIZE
            n = min(PAGE_SIZE << order, f.size - start)
            _zeros(h, start - at)
            for off in range(0, n, COPY_CHUNK):
                data = mem.read(phys + off, min(COPY_CHUNK, n - off), "memfd folio")
                h.update(data)
                written += _write_live(fd, data, start + off)
            at = start + n
        _zeros(h, f.size - at)
    finally:
        os.close(fd)
    return h.hexdigest(), written


def _write_live(fd: int, data: bytes, pos: int) -> int:
    """Write the pages of ``data`` that hold a non-zero byte, each run of them at once;
    return how many pages were written."""
    full = len(data) // PAGE_SIZE
    pages = np.frombuffer(data, np.uint8, count=full * PAGE_SIZE).reshape(-1, PAGE_SIZE)
    live: list[int] = np.flatnonzero(pages.any(axis=1)).tolist()
    if len(data) % PAGE_SIZE and any(data[full * PAGE_SIZE :]):
        live.append(full)
    runs: list[list[int]] = []  # [first, last] page of each run
    for k in live:
        if runs and runs[-1][1] == k - 1:
            runs[-1][1] = k
        else:
            runs.append([k, k])
    for first, last in runs:
        os.pwrite(fd, data[first * PAGE_SIZE : (last + 1) * PAGE_SIZE], pos + first * PAGE_SIZE)
    return len(live)


def _zeros(h: Any, n: int) -> None:
    while n > 0:
        h.update(ZEROS[: min(n, len(ZEROS))])
        n -= len(ZEROS)
