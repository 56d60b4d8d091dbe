"""procs.own_inherited_pages: a forked child copies what it shares with its parent up front,
so its first writes take no copy-on-write fault (a spare adopted inside a VM's pause)."""

from __future__ import annotations

import mmap
import os
import resource

from liveupdate import procs

PAGES = 2048


def _faults_writing(buf: bytearray, own_first: bool) -> tuple[int, int]:
    """In a forked child: (pages copied up front, minor faults while writing one byte per
    page of ``buf``), through a pipe."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            copied = procs.own_inherited_pages() if own_first else 0
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for at in range(0, len(buf), 4096):
                buf[at] = 2
            after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            os.write(w, f"{copied} {after - before}".encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        said = os.read(r, 64).split()
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    return int(said[0]), int(said[1])


def test_a_child_that_owns_its_pages_first_writes_them_without_faults() -> None:
    buf = bytearray(b"\1" * (PAGES * 4096))  # written: present in the parent, then shared
    copied, faults = _faults_writing(buf, own_first=True)
    _, faults_without = _faults_writing(buf, own_first=False)
    assert faults_without >= PAGES * 0.9  # each page a copy-on-write fault...
    assert copied >= PAGES and faults < PAGES * 0.1, (copied, faults)  # ...taken ahead
    assert buf[0] == 1  # the parent's pages are its own still


def _rss_kib() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Rss:"))


def test_pages_never_touched_stay_unpopulated() -> None:
    """Only what is present is copied: a large private allocation never written costs the
    child nothing (MADV_POPULATE_WRITE over the whole mapping would fill 256 MiB)."""
    untouched = mmap.mmap(-1, 256 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                before = _rss_kib()
                procs.own_inherited_pages()
                os.write(w, str(_rss_kib() - before).encode())
            finally:
                os._exit(0)
        os.close(w)
        grown_kib = int(os.read(r, 64))
        os.close(r)
        os.waitpid(pid, 0)
        assert grown_kib < 64 << 10, grown_kib  # its own copies only, not the mapping
    finally:
        untouched.close()
