"""Permissions as Linux has them, on one machine for the module: ``/dev/liveupdate`` is root's
(mode 0600: EACCES), ``kexec_file_load`` and ``reboot`` need CAP_SYS_BOOT (EPERM before the
image is parsed), debugfs is root's (0700) -- judged by the caller's credentials *at each
call*, read by the kernel from the host, never reported by the caller. A program that cannot
be started is an errno and one line."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from liveupdate.errors import LiveUpdateError
from liveupdate.machine.client import MachineClient, start

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="changing uid needs root")

NOBODY = 65534

# What a process may do, as errnos (0: allowed). A garbage image is ENOEXEC for a caller that
# passes the capability check (the image is parsed) and EPERM for one that does not.
PROBE = r"""
import errno, json, os, sys
from liveupdate.client.syscall import Kernel
from liveupdate.errors import LiveUpdateError
k = Kernel()
def err(fn, *a):
    try:
        r = fn(*a)
    except LiveUpdateError as e:
        return e.errno
    if isinstance(r, int) and fn == k.open:
        os.close(r)
    return 0
def probe():
    return {"open": err(k.open, "/dev/liveupdate"),
            "kexec": err(k.kexec_file_load, b"LUKIMG01" + b"\xff" * 40, ""),
            "unload": err(k.kexec_unload),
            "reboot": err(k.reboot, 0x12345),
            "debugfs": err(k.debugfs_read, "out/scratch_len"),
            "memfd": err(k.memfd_create, "x"),
            "uid": os.geteuid()}
"""

DROP = PROBE + r"""
from liveupdate.client.device import LiveUpdate
out = {"root": probe()}
held = LiveUpdate()  # opened as root, kept across the drop
os.setgid(65534)
os.setuid(65534)  # from here on this process is nobody, without capabilities
out["dropped"] = probe()
s = held.create_session("perm")  # an open fd keeps the rights it was opened with
out["held_fd"] = s.name
s.close()
held.close()
print(json.dumps(out))
"""

ROOT = {"open": 0, "kexec": errno.ENOEXEC, "unload": 0, "reboot": errno.EINVAL,
        "debugfs": 0, "memfd": 0, "uid": 0}
REFUSED = {"open": errno.EACCES, "kexec": errno.EPERM, "unload": errno.EPERM,
           "reboot": errno.EPERM, "debugfs": errno.EACCES, "memfd": 0, "uid": NOBODY}


@pytest.fixture(scope="module")
def m(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MachineClient]:
    folder = tmp_path_factory.mktemp("perm") / "m"
    proc, client = start(str(folder), memory=1 << 30, cmdline="kho=on liveupdate=on",
                         log=str(folder) + ".log")
    try:
        client.booted(60)
        yield client
    finally:
        client.shutdown()
        proc.wait(30)


def _json(r: dict) -> dict:
    assert r["status"] == 0, r["stderr"]
    out: dict = json.loads(r["stdout"].strip().splitlines()[-1])
    return out


def test_a_process_that_drops_to_nobody_is_refused_from_then_on(m: MachineClient) -> None:
    """The same process, the same syscall connection: root is allowed everything; after
    ``setuid(65534)`` the kernel sees uid 65534 without CAP_SYS_BOOT at the next call
    (credentials fixed at connect time would still say root)."""
    out = _json(m.run([sys.executable, "-c", DROP]))
    assert out["root"] == ROOT
    assert out["dropped"] == REFUSED
    assert out["held_fd"] == "perm"
    assert m.status()["state"] == "running"  # reboot was refused, not attempted


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs util-linux setpriv")
def test_a_nobody_process_and_a_root_one_without_cap_sys_boot(m: MachineClient) -> None:
    """A process that is uid 65534 from its start is refused the device (EACCES) and
    kexec_file_load (EPERM); uid 0 without CAP_SYS_BOOT (dropped from the bounding set
    before exec) still owns the device node but may not load or reboot: the capability is
    read from the process, not inferred from its uid."""
    probe = [sys.executable, "-c", PROBE + "print(json.dumps(probe()))"]
    nobody = _json(m.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                          "--clear-groups", "--", *probe]))
    assert nobody == REFUSED
    no_boot = _json(m.run(["setpriv", "--bounding-set=-sys_boot", "--inh-caps=-sys_boot",
                           "--", *probe]))
    assert no_boot == {**ROOT, "kexec": errno.EPERM, "unload": errno.EPERM,
                       "reboot": errno.EPERM}


def test_a_program_that_cannot_start_is_an_errno(m: MachineClient, tmp_path: Path) -> None:
    """``luoctl machine run -- missing``: ENOENT (execve's), EACCES for a file that is not
    executable -- one line each, no kernel oops."""
    with pytest.raises(LiveUpdateError) as e:
        m.run(["no-such-program-here"])
    assert e.value.errno == errno.ENOENT and "no-such-program-here" in e.value.message
    plain = tmp_path / "not-executable"
    plain.write_text("#!/bin/sh\n")
    with pytest.raises(LiveUpdateError) as e:
        m.run([str(plain)])
    assert e.value.errno == errno.EACCES
    luoctl = Path(sys.executable).with_name("luoctl")
    cli = subprocess.run([str(luoctl), "machine", "--dir", m.dir, "run", "--",
                          "no-such-program-here"], capture_output=True, text=True, timeout=60)
    assert cli.returncode == 1
    assert cli.stderr.count("\n") == 1 and "No such file" in cli.stderr, cli.stderr
    assert b"oops" not in m.console()[1] and b"BUG" not in m.console()[1]
    assert m.status()["state"] == "running"
