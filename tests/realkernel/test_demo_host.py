"""The real host's zero-copy witness, here on the host (no QEMU): the page frames of a
memfd read through /proc/PID/fd and /proc/self/pagemap stay the same for the same file and
differ for a copy -- the comparison the real-kernel live update makes across its kexec."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from liveupdate.realkernel import demo_host
from liveupdate.realkernel.demo_host import RealHost, Services

SIZE = 1 << 20


def _memfd(fill: bytes) -> int:
    fd = os.memfd_create("lu-test")
    os.ftruncate(fd, SIZE)
    os.pwrite(fd, fill * SIZE, 0)
    return fd


def test_the_same_memfd_has_the_same_frames_and_a_copy_other_ones() -> None:
    fd, copy = _memfd(b"a"), _memfd(b"a")
    try:
        first = demo_host.memfd_pfns(os.getpid(), fd, SIZE)
        if not any(first):
            pytest.skip("pagemap shows no page frames here (not root)")
        # another process's view, through its /proc/PID/fd: the same frames
        child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                                 stdin=subprocess.PIPE, pass_fds=(fd,))
        try:
            assert demo_host.memfd_pfns(child.pid, fd, SIZE) == first
        finally:
            child.communicate(b"")
        assert len(first) == SIZE // demo_host.PAGE and len(set(first)) == len(first)
        other = demo_host.memfd_pfns(os.getpid(), copy, SIZE)
        assert not set(other) & set(first)  # same bytes, other pages: a copy
    finally:
        os.close(fd)
        os.close(copy)


def test_the_zero_copy_verdict_names_moved_and_absent_pages(tmp_path: Path) -> None:
    h = RealHost(Services(tmp_path, 1, print), pfns_before=[5, 6, 7, 8])
    assert h.zero_copy_problem("vm0") is None  # nothing after yet: unchecked
    h.pfns_after = [5, 6, 7, 8]
    assert h.zero_copy_problem("vm0") == ""
    h.pfns_after = [5, 6, 9, 10]
    assert "2 of 4 pages lie on other page frames" in (h.zero_copy_problem("vm0") or "")
    h.pfns_after = [5, 0, 7, 8]
    assert "1 after (not root?)" in (h.zero_copy_problem("vm0") or "")
