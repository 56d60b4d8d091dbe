"""Honesty beyond held fds (kernel/confine.py): what a kernel or its userspace leaves on the
host must not reach the next kernel.

A kernel that opens a file and closes it again holds no fd the fd-based test could see: the
kernel's filesystem audit panics at the open instead, naming the file. Userspace writes state
to ``run/`` (a tmpfs the machine empties at every boot), to the disk or elsewhere on the host
(read-only to it: Landlock), or leaves a socket bound (the previous kernel's are unreachable):
a planted program that tries every one of these and reads them back after the update finds
nothing -- while the same program with the confinement off does carry state across, so the
check is one that can fail.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from liveupdate.errors import LiveUpdateError
from liveupdate.machine.client import MachineClient
from tests.e2e.conftest import Factory
from tests.e2e.test_honesty import _descendants, _fds, honesty_violations
from tests.e2e.unix_diag import unix_peers

STASH = r'''
import errno, os, signal, socket, sys
tag = sys.argv[1]
disk = os.getcwd()
run = os.path.join(os.path.dirname(disk), "run")
places = [os.path.join(run, "stash"), os.path.join(disk, "stash"), f"/tmp/lu-stash-{tag}"]
sock, abstract = os.path.join(run, "stash.sock"), f"\0lu-stash-{tag}"

def err(e):
    return errno.errorcode.get(e.errno, str(e.errno))

def read(p):
    try:
        with open(p) as f:
            return "found:" + f.read()
    except OSError as e:
        return err(e)

def connect(addr):
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(addr)
            return "connected"
        except OSError as e:
            return err(e)

def write(p):
    try:
        with open(p, "w") as f:
            f.write(str(os.getpid()))
        return "ok"
    except OSError as e:
        return err(e)

found = [read(p) for p in places] + [connect(sock), connect(abstract)]
wrote = [write(p) for p in places]
servers, bound = [], []
for addr in (sock, abstract):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(addr)
        s.listen()
        servers.append(s)
        bound.append("ok")
    except OSError as e:
        bound.append(err(e))
print("stash:", " ".join(found), "wrote", " ".join(wrote), "bound", " ".join(bound),
      flush=True)
signal.pause()
'''


def _stash(m_dir: Path, tag: str) -> None:
    disk = m_dir / "disk"
    disk.mkdir(parents=True, exist_ok=True)
    (disk / "stash.py").write_text(STASH)
    (disk / "services").write_text(f"{sys.executable} stash.py {tag}\n")


def _said(m: MachineClient, off: int) -> list[str]:
    line = m.wait(r"stash: .* wrote .*\n", offset=off)["line"]
    # a pattern that ends in a newline reports the line after it too when it is already
    # there (a service adopted from a spare prints before init says it started)
    return str(line).split("stash:", 1)[1].split("\n", 1)[0].split()


def test_a_file_read_at_boot_is_caught(machine: Factory) -> None:
    m = machine("kho=on kho_disk=1", wait=False)
    with pytest.raises(LiveUpdateError, match=r"kernel open \S+/disk/\.kho_disk: outside"):
        m.booted(60)


def test_without_the_audit_the_fd_check_misses_a_file_read(machine: Factory) -> None:
    """The same cheat with the audit off crosses the kexec and holds no fd: only the audit
    catches it."""
    m = machine("kho=on kho_disk=1 lu.confine=0")
    off = m.status()["console_bytes"]
    st = m.kexec()
    m.wait("kho_disk: read the previous kernel's boot id", offset=off)
    assert honesty_violations(st) == []


def test_userspace_state_does_not_cross_the_update(machine: Factory, tmp_path: Path) -> None:
    tag = f"{os.getpid()}-{tmp_path.name}"
    _stash(tmp_path / "m0", tag)
    m = machine("kho=on")
    first = _said(m, 0)
    # nothing there yet; run/ is writable, the disk and the rest of the host are not
    assert first == ["ENOENT"] * 4 + ["ECONNREFUSED", "wrote", "ok", "EACCES", "EACCES",
                                      "bound", "ok", "ok"], first
    off = m.status()["console_bytes"]
    st = m.kexec()
    second = _said(m, off)
    # run/ was emptied; the previous kernel's sockets are unreachable, by path and by name
    assert second[:4] == ["ENOENT"] * 4, second
    assert second[4] in ("EPERM", "ECONNREFUSED"), second
    assert second[-2:] == ["ok", "ok"], second  # its own, where the previous one's were
    # and no socket of the next kernel's userspace has its peer outside this kernel
    kpid = int(st["kernel_pid"])
    ours = {kpid} | _descendants(kpid)
    held = {obj[1] for p in ours for obj, t in _fds(p).values() if t.startswith("socket:")}
    peers = unix_peers()
    strays = [(p, t) for p in ours - {kpid} for obj, t in _fds(p).values()
              if obj[1] in peers and peers[obj[1]] not in held]
    assert strays == []


def test_unconfined_userspace_state_crosses_the_disk(machine: Factory, tmp_path: Path) -> None:
    """The planted program is a real cheat: with the confinement off its disk stash reaches
    the next kernel (``run/`` is still emptied: that is the machine's)."""
    tag = f"{os.getpid()}-{tmp_path.name}"
    _stash(tmp_path / "m0", tag)
    m = machine("kho=on lu.confine=0")
    assert _said(m, 0)[5:9] == ["wrote", "ok", "ok", "ok"]
    off = m.status()["console_bytes"]
    m.kexec()
    second = _said(m, off)
    Path(f"/tmp/lu-stash-{tag}").unlink()
    assert second[0] == "ENOENT" and second[1].startswith("found:"), second
    assert second[2].startswith("found:"), second


CONSOLE = r'''
import errno, os, sys
d, machine_pid = sys.argv[1], sys.argv[2]
log = os.path.join(d, "console.log")
got = []
for p in (log, f"/proc/{machine_pid}/root{log}"):
    try:
        with open(p, "rb") as f:
            got.append("found" if b"confine:" in f.read() else "empty")
    except OSError as e:
        got.append(errno.errorcode.get(e.errno, str(e.errno)))
print(" ".join(got))
'''


@pytest.mark.parametrize(("cmdline", "want"), [
    ("kho=on", ["empty", "EACCES"]),  # covered in the kernel's mount namespace; no ptrace
    ("kho=on lu.confine=0", ["found", "found"]),  # the channel is real
])
def test_userspace_cannot_read_the_machines_console(machine: Factory, cmdline: str,
                                                    want: list[str]) -> None:
    """Whatever a process prints reaches the console; if the next kernel's userspace could
    read the console log, that would carry state across the update (kernel/mountns.py)."""
    m = machine(cmdline)
    if "lu.confine=0" not in cmdline:
        said = m.wait(r"confine: (\d+ machine files out of|the machine's own files stay)")
        if "stay" in said["line"]:
            pytest.skip(f"this host cannot cover the machine's files: {said['line'].strip()}")
    st = m.status()
    r = m.run([sys.executable, "-c", CONSOLE, m.dir, str(st["machine_pid"])])
    assert r["status"] == 0, r["stderr"]
    assert r["stdout"].split() == want
