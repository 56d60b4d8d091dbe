"""``luoctl update --detach DIR`` (:mod:`liveupdate.client.detach`): the update's process
outlives the one that started it -- its own session, none of the caller's fds -- and its
record and log are named by the update's number; ``settle`` waits for it only while luod
still runs the kernel it started on."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from liveupdate.client import detach
from liveupdate.errors import LiveUpdateError
from tests.tools.cli import LUOCTL

# the detached program: blocks until the test opens the FIFO, then says so in its log
CHILD = textwrap.dedent("""
    import sys
    with open(sys.argv[1]) as fifo:
        fifo.read()
    print("released", flush=True)
""")


def start_from_a_parent_that_exits(tmp: Path, number: int, boot: str) -> dict[str, object]:
    """A parent process spawns the detached program and exits; its stdout is a pipe we
    read to the end -- were the child holding it, this would not return."""
    fifo = tmp / "release"
    os.mkfifo(fifo)
    parent = textwrap.dedent(f"""
        import json, sys
        from liveupdate.client import detach
        rec = detach.spawn([sys.executable, "-c", {CHILD!r}, {str(fifo)!r}], {str(tmp)!r},
                           {number}, {{"boot_id_before": {boot!r}}})
        print(json.dumps(rec))
    """)
    p = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    rec: dict[str, object] = json.loads(p.stdout)
    return {**rec, "parent": p, "fifo": fifo}


def release(rec: dict[str, object]) -> None:
    with open(str(rec["fifo"]), "w") as f:
        f.write("go")


def stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def test_the_detached_update_outlives_its_parent_in_its_own_session(tmp_path: Path) -> None:
    rec = start_from_a_parent_that_exits(tmp_path, 7, "boot-a")
    pid = int(str(rec["pid"]))
    try:
        fields = stat_fields(pid)  # state, ppid, pgrp, session, ...
        assert fields[0] != "Z"  # alive after its parent's exit
        assert int(fields[3]) == pid  # the leader of its own session: no SIGHUP with ours
        assert int(fields[1]) != os.getpid()  # reparented: not ours, its parent is gone
        assert rec["update"] == 7
        assert rec["log"] == str(tmp_path / "update-7.log")
        assert rec["record"] == str(tmp_path / "update-7.json")
        on_disk = json.loads((tmp_path / "update-7.json").read_text())
        assert on_disk["pid"] == pid and on_disk["update"] == 7
        assert on_disk["boot_id_before"] == "boot-a"
    finally:
        release(rec)
    assert detach.wait_exit(pid, 30)
    assert (tmp_path / "update-7.log").read_text() == "released\n"
    assert detach.record(str(tmp_path), 7)["last_line"] == "released"


def test_settle_waits_only_on_the_kernel_the_update_started_on(tmp_path: Path) -> None:
    rec = start_from_a_parent_that_exits(tmp_path, 3, "boot-a")
    try:
        # luod answers from the next kernel: nothing to wait for
        assert detach.settle(str(tmp_path), 3, "boot-b", 30)["pid"] == rec["pid"]
        # the same kernel, the update still running: it is waited for (here: in vain)
        with pytest.raises(LiveUpdateError) as e:
            detach.settle(str(tmp_path), 3, "boot-a", 0.05)
        assert e.value.errno == errno.ETIMEDOUT
    finally:
        release(rec)
    assert detach.settle(str(tmp_path), 3, "boot-a", 30)["update"] == 3
    with pytest.raises(LiveUpdateError) as e:
        detach.settle(str(tmp_path), 4, "boot-a", 1)
    assert e.value.errno == errno.ENOENT


def test_detach_without_luod_is_one_line(tmp_path: Path) -> None:
    r = subprocess.run([*LUOCTL, "update", "--detach", str(tmp_path), "--json", "--socket",
                        str(tmp_path / "no.sock")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("luoctl: error:") and r.stderr.count("\n") == 1, r.stderr
    assert list(tmp_path.iterdir()) == []  # nothing started, nothing recorded
    r = subprocess.run([*LUOCTL, "wait", "--update", "2", "--detached", str(tmp_path),
                        "--timeout", "0", "--socket", str(tmp_path / "no.sock")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "ENOENT" in r.stderr and r.stderr.count("\n") == 1
