"""Only RAM and the boot parameters' address cross a kexec (ARCHITECTURE.md, invariant 1).

The kernel process is checked by object identity, not by name: every fd it holds is the
machine's RAM memfd (and Python's mmap duplicate of it), its link to the machine (whose peer
the machine process holds), /dev/null and the console pipe -- or a socket whose peer one of its
own userspace processes holds. Its parent is the machine, its argv its template's (the
interpreter that forks kernels, :mod:`liveupdate.kernel.template`), its environment empty. A
test component that leaks one file across the jump must make the check fail. The template is
checked the same way: it holds its control socket to the machine and stdio, nothing else; an
fd planted in it is caught, and is not in the kernels it forks.
"""

from __future__ import annotations

import errno
import json
import os
import select
import subprocess
import sys
from pathlib import Path
from typing import Any

import liveupdate
from liveupdate.abi.consts import PAGE_SIZE
from liveupdate.abi.physmem import PhysMem
from liveupdate.abi.wire import seqpacket_pair
from liveupdate.ipc import fds as scm
from liveupdate.kernel.template import LINK_FD
from liveupdate.machine.client import RemoteRam
from liveupdate.tools import report
from tests.e2e.conftest import Factory
from tests.e2e.unix_diag import unix_peers

Obj = tuple[int, int]  # (st_dev, st_ino)


def _fds(pid: int) -> dict[int, tuple[Obj, str]]:
    out = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        path = f"/proc/{pid}/fd/{name}"
        try:
            st, target = os.stat(path), os.readlink(path)
        except FileNotFoundError:  # closed while we looked
            continue
        out[int(name)] = ((st.st_dev, st.st_ino), target)
    return out


def _pidfd_pid(pid: int, fd: int) -> int:
    """The process a pidfd of ``pid`` names; -1 if the fd was closed while we looked."""
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("Pid:")), -1)
    except OSError:
        return -1


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return int(stat[stat.rfind(b")") + 2 :].split()[1])


def _descendants(pid: int) -> set[int]:
    found, frontier = set(), {pid}
    procs = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    parent = {}
    for p in procs:
        try:
            parent[p] = _ppid(p)
        except OSError:
            continue
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier} - found
        found |= frontier
    return found


TEMPLATE_ARGV = [sys.executable, "-u", "-m", "liveupdate.kernel.main", "--template-fd"]


def _identity(pid: int, parent: int) -> tuple[list[str], list[str]]:
    """A kernel's or a template's process: its parent, the template's argv (a kernel is
    forked from it) with the control socket's fd, an empty environment. (what is wrong,
    argv)"""
    bad = []
    if _ppid(pid) != parent:
        bad.append(f"parent is {_ppid(pid)}, not {parent}")
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().decode().split("\0")[:-1]
    if argv[:-1] != TEMPLATE_ARGV or not argv[-1].isdigit():
        bad.append(f"argv {argv} is not the template's")
    with open(f"/proc/{pid}/environ", "rb") as f:
        if f.read():
            bad.append("environment is not empty")
    return bad, argv


def _stdio(fd: int, obj: Obj, parent_pipes: set[Obj]) -> bool:
    """/dev/null on 0, a pipe the parent holds (the console) on 1 and 2."""
    devnull = os.stat("/dev/null")
    return (fd == 0 and obj == (devnull.st_dev, devnull.st_ino)) or \
        (fd in (1, 2) and obj in parent_pipes)


CODE = tuple(os.path.realpath(p) + "/" for p in (sys.prefix, sys.base_prefix,
                                                  os.path.dirname(liveupdate.__file__)))


def honesty_violations(st: dict[str, Any], *, loading: bool = False) -> list[str]:
    """What the kernel process of ``st`` holds beyond what the machine gave it. ``loading``:
    a spare that may still be starting, reading its own code (the interpreter's and the
    package's files) -- the machine loading the kernel image, not state."""
    kpid, mpid = int(st["kernel_pid"]), int(st["machine_pid"])
    bad, _ = _identity(kpid, mpid)
    machine = _fds(mpid)
    ram = {obj for obj, t in machine.values() if t.startswith("/memfd:lu-ram")}
    pipes = {obj for obj, t in machine.values() if t.startswith("pipe:")}
    machine_socks = {obj[1] for obj, t in machine.values() if t.startswith("socket:")}
    user_socks = {obj[1] for d in _descendants(kpid) for obj, t in _fds(d).values()
                  if t.startswith("socket:")}
    peers = unix_peers()
    link_fd = LINK_FD
    held = _fds(kpid)
    if sum(obj in ram for obj, _ in held.values()) not in (1, 2):
        bad.append("the RAM memfd is not held once (plus its mmap duplicate)")
    def to_userspace(fd: int) -> bool:
        peer = peers.get(held[fd][0][1]) if fd in held else None
        return fd > 2 and fd != link_fd and peer is not None and peer in user_socks

    for fd, (obj, target) in sorted(held.items()):
        peer = peers.get(obj[1])
        if _stdio(fd, obj, pipes) or obj in ram:
            continue
        if fd == link_fd and peer in machine_socks:
            continue
        if to_userspace(fd):
            continue
        if target == "anon_inode:[eventpoll]" and all(map(to_userspace, _epoll(kpid, fd))):
            continue  # the hang-up watcher (FileTable.release_promptly): handles' ends only
        if loading and target.startswith(CODE):
            continue
        if target == "anon_inode:[pidfd]" and _pidfd_pid(kpid, fd) in {-1, *_descendants(kpid)}:
            continue  # the sender of a call being served (SCM_PIDFD, kernel/syscalls/creds)
        bad.append(f"fd {fd} ({target}) is not RAM, the link, stdio or a socket to its own "
                   "userspace")
    return bad


def _epoll(pid: int, fd: int) -> list[int]:
    """The fds an epoll instance of ``pid`` watches (``tfd:`` lines of its fdinfo)."""
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        return [int(line.split()[1]) for line in f if line.startswith("tfd:")]


def template_violations(pid: int, parent: int) -> list[str]:
    """What a kernel template holds beyond stdio and its control socket to ``parent``."""
    bad, argv = _identity(pid, parent)
    ours = _fds(parent)
    pipes = {obj for obj, t in ours.values() if t.startswith("pipe:")}
    socks = {obj[1] for obj, t in ours.values() if t.startswith("socket:")}
    peers = unix_peers()
    for fd, (obj, target) in sorted(_fds(pid).items()):
        if _stdio(fd, obj, pipes):
            continue
        if fd == int(argv[-1]) and peers.get(obj[1]) in socks:
            continue
        bad.append(f"fd {fd} ({target}) is not stdio or its control socket")
    return bad


def test_the_template_holds_nothing_and_its_kernels_nothing_of_it(tmp_path: Path) -> None:
    """A template started with one fd too many: the check names the fd; a kernel it forks
    holds RAM, its link and stdio only (the planted fd is closed) and has nothing to run
    until "go" (its link closes: it exits)."""
    planted = tmp_path / "planted"
    planted.write_bytes(b"state")
    ours, theirs = seqpacket_pair()
    rd, wr = os.pipe()
    with open(planted, "rb") as extra:
        p = subprocess.Popen([*TEMPLATE_ARGV, str(theirs.fileno())],
                             pass_fds=(theirs.fileno(), extra.fileno()),
                             stdin=subprocess.DEVNULL, stdout=wr, stderr=wr, env={}, cwd="/")
    theirs.close()
    os.close(wr)
    try:
        # Popen returns once exec closed the CLOEXEC error pipe, which is before the new
        # image's argv is in place (/proc/PID/cmdline reads empty in between): a request it
        # answers (one fd, not three: EINVAL) proves the template runs its own code.
        with open(os.devnull, "rb") as one:
            scm.sendmsg(ours, b"fork", (one.fileno(),))
        assert json.loads(ours.recv(4096))["errno"] == errno.EINVAL
        bad = template_violations(p.pid, os.getpid())
        assert len(bad) == 1 and str(planted) in bad[0], bad
        ram = os.memfd_create("lu-ram-test")
        mside, kside = seqpacket_pair()
        crd, cwr = os.pipe()
        scm.sendmsg(ours, b"fork", (ram, kside.fileno(), cwr))
        kpid = int(json.loads(ours.recv(4096))["pid"])
        for fd in (ram, cwr):
            os.close(fd)
        kside.close()
        fds = {fd: target for fd, (_, target) in _fds(kpid).items()}
        assert sorted(fds) == [0, 1, 2, 3, LINK_FD] and fds[3].startswith("/memfd:lu-ram")
        assert str(planted) not in fds.values()
        kernel = os.pidfd_open(kpid)
        mside.close()  # no "go": the kernel has nothing to run
        assert select.select([kernel], [], [], 30)[0]
        os.close(kernel)
        os.close(crd)
    finally:
        ours.close()  # EOF: the template exits
        assert p.wait(30) == 0
        os.close(rd)


def test_the_machines_template_holds_nothing_but_its_control_socket(machine: Factory) -> None:
    m = machine("kho=on")
    st = m.status()
    assert st["templates"], st
    for pid in st["templates"].values():
        assert template_violations(pid, st["machine_pid"]) == []


def _service(tmp_path: Path) -> None:
    disk = tmp_path / "m0" / "disk"
    disk.mkdir(parents=True, exist_ok=True)
    (disk / "services").write_text(f"{sys.executable} -c 'import signal; signal.pause()'\n")


def test_kernel_holds_only_what_the_machine_gave(machine: Factory, tmp_path: Path) -> None:
    _service(tmp_path)  # a userspace process with its own syscall socket
    m = machine("kho=on test_kho=1")
    first = m.status()
    assert honesty_violations(first) == []
    old_run = first["kernel"]["run_dir"]
    m.kexec_load(finalize=True)
    loaded = m.status()
    spare = {"kernel_pid": loaded["spare_pid"], "machine_pid": loaded["machine_pid"]}
    assert honesty_violations(spare, loading=True) == []  # the next kernel, before the jump
    st = m.kexec_exec()
    assert st["kernel_pid"] == loaded["spare_pid"] and st["kernel"]["kho_boot"]
    m.wait("init: started", offset=first["console_bytes"])
    assert honesty_violations(st) == []
    assert not os.path.exists(old_run)  # the previous kernel's runtime folder is gone
    m.wait("KHO restore succeeded", offset=first["console_bytes"])
    # test_kho's 8 MiB and its folios_info array as a KHO vmalloc area: a block and a chunk
    assert m.kho_status()["in"]["restored_pages"] == 2048 + 2


def test_a_leaked_file_is_caught(machine: Factory) -> None:
    # the filesystem audit would panic at kho_leak's open (tests/e2e/test_confine.py): off,
    # so this shows the fd check catches the held file on its own
    m = machine("kho=on kho_leak=1 lu.confine=0")
    off = m.status()["console_bytes"]
    st = m.kexec()
    m.wait("kho_leak: read the previous kernel's boot id", offset=off)
    bad = honesty_violations(st)
    assert len(bad) == 1 and ".kho_leak" in bad[0], bad


MARKER = b"UNPRESERVED-MARK"


def test_unpreserved_markers_read_zero_after_kexec(machine: Factory) -> None:
    m = machine("kho=on", memory=1 << 30)
    m.kexec_load(finalize=True)  # no LUO: the selftest's way
    segs = m.kho_status()["kexec"]["segments"]
    assert len(segs) == 3
    places = [0x9F000 + 0x80, 0xFFFF0]  # the e820 hole below 1 MiB
    for s in segs:
        phys, bufsz, memsz = int(s["phys"], 16), s["bufsz"], s["memsz"]
        if bufsz % PAGE_SIZE and bufsz % PAGE_SIZE + 2 * len(MARKER) < PAGE_SIZE:
            places.append(phys + bufsz + len(MARKER))  # same page as the data, after it
        if memsz - bufsz > 2 * PAGE_SIZE:
            places.append(phys + -(-bufsz // PAGE_SIZE) * PAGE_SIZE + PAGE_SIZE)
            places.append(phys + memsz - len(MARKER))  # the segment's last bytes
    places += [(600 << 20) + i * (7 << 20) for i in range(8)]  # free pages
    for p in places:
        m.ram_write(p, MARKER)
    assert all(m.ram_read(p, len(MARKER)) == MARKER for p in places)
    st = m.kexec_exec()
    assert st["kernel"]["kho_boot"]
    # Nothing of the handover lives at these places (the hole and segment tails are reserved
    # by the next kernel, the free pages are not preserved): every byte reads zero.
    survivors = [hex(p) for p in places if m.ram_read(p, len(MARKER)) != bytes(len(MARKER))]
    assert survivors == []


def test_big_reserve_mem_keeps_upstreams_uncapped_orders(machine: Factory) -> None:
    m = machine("kho=on reserve_mem=24M:16M:big")
    region = m.kho_status()["reserve_mem"][0]
    start = int(region["start"], 16)
    assert start % (16 << 20) == 0
    m.ram_write(start + (20 << 20), b"in the order-11 block")
    off = m.status()["console_bytes"]
    m.kexec()
    m.wait("reserve_mem: big at .* \\(revived from KHO\\)", offset=off)
    kho = m.kho_status()
    orders = {p["order"]: p["blocks"] for p in kho["in"]["preserved"]}
    assert orders.get(12) == 1 and orders.get(11) == 1, orders
    assert {p["order"] for p in kho["out"]["preserved"]} >= {11, 12}  # preserved again
    assert m.ram_read(start + (20 << 20), 21) == b"in the order-11 block"
    # luoctl kho inspect's view: the outgoing handover, finalized, decoded through RAM
    m.run([sys.executable, "-c", "from liveupdate.client.syscall import Kernel; "
           "Kernel().debugfs_write('out/finalize', b'1')"])
    rep = report.describe(m.kho_out_fdt(), PhysMem(RemoteRam(m, m.status()["memory"])))
    per_order = {p["order"]: p["blocks"] for p in rep["memory"]["per_order"]}
    assert per_order[12] == 1 and per_order[11] == 1, per_order
    assert [start, start + (24 << 20)] in [[int(a, 16), int(b, 16)]
                                          for a, b in rep["memory"]["ranges"]]
