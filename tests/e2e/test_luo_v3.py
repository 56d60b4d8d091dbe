"""LUO v3 across real kexecs of the emulated machine: the v3-era self-tests (spec/luo.md 6.3)
and memfd cases, run by userspace programs of the machine (tests/e2e/luo_prog.py)."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from liveupdate.errors import LiveUpdateError
from liveupdate.machine.client import MachineClient
from tests.e2e import luo_prog
from tests.e2e.conftest import CMDLINE, V3

MiB = 1 << 20


def luo(m: MachineClient) -> dict:
    status: dict = m.kho_status()["luo"]
    return status


def update(m: MachineClient) -> dict:
    m.kexec_load(V3)
    return m.kexec_exec()


STATE_MACHINE = r'''
dev = k.open("/dev/liveupdate")
out = {"second_open": err(k.open, "/dev/liveupdate")}
out["normal"] = io(dev, "GET_STATE")["state"]
out["freeze"] = io(dev, "SET_EVENT", event=1).get("errno")
out["unknown"] = io(dev, "SET_EVENT", event=7).get("errno")
out["finish_in_normal"] = io(dev, "SET_EVENT", event=2).get("errno")
out["restore_in_normal"] = io(dev, "FD_RESTORE", token=1).get("errno")
mfd = k.memfd_create("t")
k.pwrite(mfd, b"data", 0)
r, w = os.pipe()
out["pipe"] = io(dev, "FD_PRESERVE", fd=r, token=1).get("errno")
out["bad_fd"] = io(dev, "FD_PRESERVE", fd=999, token=1).get("errno")
out["device"] = io(dev, "FD_PRESERVE", fd=dev, token=1).get("errno")
out["preserve"] = io(dev, "FD_PRESERVE", fd=mfd, token=1).get("errno", "ok")
out["duplicate"] = io(dev, "FD_PRESERVE", fd=mfd, token=1).get("errno")
out["unpreserve_unknown"] = io(dev, "FD_UNPRESERVE", token=2).get("errno")
out["fd_state"] = io(dev, "GET_FD_STATE", token=1)["state"]
out["prepare"] = io(dev, "SET_EVENT", event=0).get("errno", "ok")
out["prepared"] = io(dev, "GET_STATE")["state"]
out["fd_state_prepared"] = io(dev, "GET_FD_STATE", token=1)["state"]
out["preserve_in_prepared"] = io(dev, "FD_PRESERVE", fd=mfd, token=3).get("errno")
out["unpreserve_in_prepared"] = io(dev, "FD_UNPRESERVE", token=1).get("errno")
out["grow"] = err(k.ftruncate, mfd, 1 << 20)
out["write_past_end"] = err(k.pwrite, mfd, b"x" * 8192, 4090)
out["fallocate"] = err(k.fallocate, mfd, 0, 0, 4096)
out["write_inside"] = err(k.pwrite, mfd, b"DATA", 0)
out["read"] = k.pread(mfd, 4, 0).decode()
out["prepare_again"] = io(dev, "SET_EVENT", event=0).get("errno")
out["cancel"] = io(dev, "SET_EVENT", event=3).get("errno", "ok")
out["after_cancel"] = io(dev, "GET_STATE")["state"]
out["grow_after_cancel"] = err(k.ftruncate, mfd, 1 << 20)
out["unpreserve"] = io(dev, "FD_UNPRESERVE", token=1).get("errno", "ok")
out["fd_state_gone"] = io(dev, "GET_FD_STATE", token=1).get("errno")
print(json.dumps(out))
'''


def test_state_machine_single_opener_and_errnos(v3: Callable[..., MachineClient]) -> None:
    m = v3()
    got = luo_prog.run(m, STATE_MACHINE)
    assert got == {
        "second_open": "EBUSY", "normal": 1, "freeze": "EINVAL", "unknown": "EINVAL",
        "finish_in_normal": "EINVAL", "restore_in_normal": "EBUSY",
        "pipe": "ENOENT", "bad_fd": "EBADF", "device": "ENOENT", "preserve": "ok",
        "duplicate": "EEXIST", "unpreserve_unknown": "ENOENT", "fd_state": 1,
        "prepare": "ok", "prepared": 2, "fd_state_prepared": 2,
        "preserve_in_prepared": "EBUSY", "unpreserve_in_prepared": "EBUSY",
        "grow": "EPERM", "write_past_end": "EPERM", "fallocate": "EPERM",
        "write_inside": "ok", "read": "DATA", "prepare_again": "EINVAL", "cancel": "ok",
        "after_cancel": 1, "grow_after_cancel": "ok", "unpreserve": "ok",
        "fd_state_gone": "ENOENT",
    }
    assert luo(m)["state"] == "normal" and luo(m)["files"] == []


PRESERVE = r'''
dev = k.open("/dev/liveupdate")
out = {"files": {}}
specs = [(0x1A, 1 << 30, True), (0x2B, 8 << 20, False), (0x3C, 3 * 4096 + 100, True)]
maps = {}
for token, size, dense in specs:
    fd = k.memfd_create(f"m{token:x}")
    k.ftruncate(fd, size)
    if dense:
        mp = k.mmap(fd, size - size % 4096 if size % 4096 else size)
        fill(mp.view, token)
        maps[token] = mp
    else:  # sparse: two islands of data, holes elsewhere
        k.pwrite(fd, b"island-1", 4096 * 3)
        k.pwrite(fd, b"island-2", size - 8)
    k.lseek(fd, 77 + token, os.SEEK_SET)
    assert io(dev, "FD_PRESERVE", fd=fd, token=token).get("errno") is None
    out["files"][hex(token)] = {"blocks_before": k.fstat(fd)["blocks"], "fd": fd}
out["prepare"] = io(dev, "SET_EVENT", event=0).get("errno", "ok")
for token, size, dense in specs:
    fd = out["files"][hex(token)]["fd"]
    st = k.fstat(fd)
    out["files"][hex(token)].update(blocks_after=st["blocks"], size=st["size"],
                                    extents=k.extents(fd, -(-size // 4096) * 4096))
    os.close(fd)  # LUO holds its own reference
# a write after PREPARE, before the reboot: carried over
maps[0x1A].view[5 << 20 : (5 << 20) + 10] = b"LATE-WRITE"
for token, mp in maps.items():
    out["files"][hex(token)]["digest"] = digest(mp.view)
hold(out)
'''

RESTORE = r'''
dev = k.open("/dev/liveupdate")
out = {"state": io(dev, "GET_STATE")["state"], "files": {}}
for token in (0x1A, 0x2B, 0x3C):
    r = io(dev, "FD_RESTORE", token=token)
    fd = r["fd"]
    st = k.fstat(fd)
    size = st["size"]
    f = {"size": size, "pos": k.lseek(fd, 0, os.SEEK_CUR), "blocks": st["blocks"],
         "extents": k.extents(fd, -(-size // 4096) * 4096)}
    if token == 0x2B:
        f["islands"] = [k.pread(fd, 8, 4096 * 3).decode(), k.pread(fd, 8, size - 8).decode()]
        f["hole"] = k.pread(fd, 4096, 0) == bytes(4096)
    else:
        mp = k.mmap(fd, size - size % 4096 if size % 4096 else size)
        f["digest"] = digest(mp.view)
        f["late"] = bytes(mp.view[5 << 20 : (5 << 20) + 10]).decode() if token == 0x1A else ""
    out["files"][hex(token)] = f
out["again"] = io(dev, "FD_RESTORE", token=0x1A).get("errno")
out["unknown"] = io(dev, "FD_RESTORE", token=0x99).get("errno")
out["finish"] = io(dev, "SET_EVENT", event=2).get("errno", "ok")
out["after_finish"] = io(dev, "GET_STATE")["state"]
out["resize_after_finish"] = err(k.ftruncate, fd, 1 << 20)
print(json.dumps(out))
'''


def test_memfds_survive_kexec_zero_copy(v3: Callable[..., MachineClient]) -> None:
    m = v3(memory=3 << 30)
    before = luo_prog.run(m, PRESERVE, timeout=300)
    assert before["prepare"] == "ok"
    files = before["files"]
    # holes were filled at PREPARE: the sparse file is fully allocated
    assert files["0x2b"]["blocks_before"] < files["0x2b"]["blocks_after"] == (8 << 20) // 512
    resident = m.status()["ram_resident"]
    phys, _ = files["0x1a"]["extents"][0]
    head = m.ram_read(phys, 64)  # the first folio, seen from the host
    st = update(m)
    assert st["kernel"]["kho_boot"]
    after = luo_prog.run(m, RESTORE, timeout=300)
    assert after["state"] == 4 and after["finish"] == "ok" and after["after_finish"] == 1
    got = after["files"]
    for token, size in (("0x1a", 1 << 30), ("0x2b", 8 << 20), ("0x3c", 3 * 4096 + 100)):
        assert got[token]["size"] == size
        assert got[token]["pos"] == 77 + int(token, 16)
        assert got[token]["extents"] == files[token]["extents"]  # the same physical pages
    assert got["0x1a"]["digest"] == files["0x1a"]["digest"]
    assert got["0x3c"]["digest"] == files["0x3c"]["digest"]
    assert got["0x1a"]["late"] == "LATE-WRITE"
    assert got["0x2b"]["islands"] == ["island-1", "island-2"] and got["0x2b"]["hole"]
    assert after["again"] == "EINVAL" and after["unknown"] == "ENOENT"
    assert after["resize_after_finish"] == "ok"  # the size freeze is lifted
    assert m.ram_read(phys, 64) == head
    assert m.status()["ram_resident"] < resident * 1.1  # nothing was copied


TWO_MAPPERS = r'''
dev = k.open("/dev/liveupdate")
fd = k.memfd_create("shared")
k.ftruncate(fd, 16 << 20)
mine = k.mmap(fd, 16 << 20)
pid = os.fork()
if pid == 0:  # a second process maps the same memfd and writes its half
    other = k.mmap(fd, 16 << 20)
    other.view[8 << 20 : (8 << 20) + 5] = b"CHILD"
    os._exit(0)
os.waitpid(pid, 0)
mine.view[0:6] = b"PARENT"
io(dev, "FD_PRESERVE", fd=fd, token=7)
io(dev, "SET_EVENT", event=0)
hold({"seen_by_parent": bytes(mine.view[8 << 20 : (8 << 20) + 5]).decode()})
'''

READ_SHARED = r'''
dev = k.open("/dev/liveupdate")
fd = io(dev, "FD_RESTORE", token=7)["fd"]
print(json.dumps([k.pread(fd, 6, 0).decode(), k.pread(fd, 5, 8 << 20).decode()]))
'''


def test_memfd_mapped_by_two_processes(v3: Callable[..., MachineClient]) -> None:
    m = v3()
    assert luo_prog.run(m, TWO_MAPPERS) == {"seen_by_parent": "CHILD"}
    update(m)
    assert luo_prog.run(m, READ_SHARED) == ["PARENT", "CHILD"]


CRASH = r'''
dev = k.open("/dev/liveupdate")
fd = k.memfd_create("c")
k.ftruncate(fd, 4 << 20)
io(dev, "FD_PRESERVE", fd=fd, token=5)
print(json.dumps({"prepare": io(dev, "SET_EVENT", event=0).get("errno", "ok")}))
'''  # exits holding /dev/liveupdate in PREPARED


def test_holder_dies_in_prepared_returns_to_normal(v3: Callable[..., MachineClient]) -> None:
    m = v3()
    free = m.kho_status()["free_pages"]
    assert luo_prog.run(m, CRASH) == {"prepare": "ok"}
    st = luo(m)
    assert st["state"] == "normal" and st["files"] == [] and st["subtree"] is None
    assert not st["device_open"]
    assert m.kho_status()["free_pages"] == free  # unpinned and freed
    m.wait("released in prepared state: cancelling")
    assert luo_prog.run(m, 'print(json.dumps(err(k.open, "/dev/liveupdate")))') == "ok"


FINISH_UNRESTORED = r'''
dev = k.open("/dev/liveupdate")
for token in (1, 2):
    fd = k.memfd_create("u")
    k.ftruncate(fd, 32 << 20)
    k.pwrite(fd, b"x", 0)
    io(dev, "FD_PRESERVE", fd=fd, token=token)
io(dev, "SET_EVENT", event=0)
hold({})
'''


def test_finish_frees_what_was_never_restored(v3: Callable[..., MachineClient]) -> None:
    m = v3("luo_trace=1")
    luo_prog.run(m, FINISH_UNRESTORED)
    off = m.status()["console_bytes"]
    update(m)
    m.wait(r"luo_trace: the previous kernel logged: boot \w+; prepare; freeze", offset=off)
    assert [f["restored"] for f in luo(m)["incoming"]] == [False, False]
    free = m.kho_status()["free_pages"]
    body = ('dev = k.open("/dev/liveupdate")\n'
            'print(json.dumps(io(dev, "SET_EVENT", event=2).get("errno", "ok")))')
    assert luo_prog.run(m, body) == "ok"
    assert m.kho_status()["free_pages"] >= free + 2 * (32 << 20) // 4096
    assert luo(m)["incoming"] == [] and luo(m)["state"] == "normal"


def test_prepare_fails_with_enomem_for_4k_folios_of_1g(v3: Callable[..., MachineClient]
                                                       ) -> None:
    m = v3("transparent_hugepage_shmem=never")
    body = r'''
dev = k.open("/dev/liveupdate")
fd = k.memfd_create("big")
k.ftruncate(fd, 1 << 30)
io(dev, "FD_PRESERVE", fd=fd, token=1)
out = {"prepare": io(dev, "SET_EVENT", event=0).get("errno", "ok")}
out["state"] = io(dev, "GET_STATE")["state"]
out["grow"] = err(k.ftruncate, fd, 2 << 30)
print(json.dumps(out))
'''
    # rolled back: NORMAL, and the memfd's size is no longer frozen
    assert luo_prog.run(m, body, timeout=300) == {"prepare": "ENOMEM", "state": 1, "grow": "ok"}


def test_kexec_outside_prepared_carries_no_luo_data(v3: Callable[..., MachineClient]) -> None:
    m = v3()
    body = r'''
dev = k.open("/dev/liveupdate")
fd = k.memfd_create("n")
k.pwrite(fd, b"unprepared", 0)
io(dev, "FD_PRESERVE", fd=fd, token=1)
hold({})
'''
    luo_prog.run(m, body)
    update(m)
    assert luo(m)["state"] == "normal" and luo(m)["incoming"] == []
    assert m.debugfs("in/fdt") and "LUO" not in str(m.kho_status()["in"]["subtrees"])


@pytest.mark.parametrize("fail, errno_name", [("prepare", "EIO"), ("freeze", "EIO")])
def test_failing_subsystem_rolls_back(v3: Callable[..., MachineClient], fail: str,
                                      errno_name: str) -> None:
    m = v3(f"luo_fail={fail}")
    body = r'''
dev = k.open("/dev/liveupdate")
fd = k.memfd_create("r")
k.ftruncate(fd, 2 << 20)
io(dev, "FD_PRESERVE", fd=fd, token=1)
hold({"prepare": io(dev, "SET_EVENT", event=0).get("errno", "ok")})
'''
    got = luo_prog.run(m, body)
    if fail == "prepare":
        assert got == {"prepare": errno_name}
        assert luo(m)["state"] == "normal" and luo(m)["files"][0]["state"] == "normal"
        return
    assert got == {"prepare": "ok"}
    m.kexec_load(V3)
    r = m.run([sys.executable, "-m", "liveupdate.userspace.kexec", "-e"])
    assert r["status"] == 1 and errno_name in r["stderr"], r
    assert m.status()["state"] == "running"
    st = luo(m)
    assert st["state"] == "normal" and st["files"][0]["state"] == "normal"
    assert st["subtree"] is None


def test_unreadable_luo_data_panics_the_next_kernel(v3: Callable[..., MachineClient]) -> None:
    m = v3("kho_corrupt=luo_compatible")
    body = r'''
dev = k.open("/dev/liveupdate")
fd = k.memfd_create("p")
k.pwrite(fd, b"x", 0)
io(dev, "FD_PRESERVE", fd=fd, token=1)
hold({"prepare": io(dev, "SET_EVENT", event=0).get("errno", "ok")})
'''
    assert luo_prog.run(m, body) == {"prepare": "ok"}
    m.kexec_load(V3, cmdline=CMDLINE)
    try:
        m.kexec_exec()
    except LiveUpdateError as e:
        assert e.errno == errno.EIO
    st = m.wait_state("panic", timeout=60)
    assert "LUO: cannot restore" in st["reason"] and "luo-v9" in st["reason"], st
    m.wait("Kernel panic - not syncing: LUO")
    m.power_cycle(cmdline=CMDLINE)  # the machine stays usable
    assert m.booted()["state"] == "running"


def test_luoctl_shows_live_luo_state(v3: Callable[..., MachineClient]) -> None:
    m = v3()
    body = r'''
dev = k.open("/dev/liveupdate")
fd = k.memfd_create("i")
k.ftruncate(fd, 4 << 20)
io(dev, "FD_PRESERVE", fd=fd, token=0x77)
hold({"prepare": io(dev, "SET_EVENT", event=0).get("errno", "ok")})
'''
    assert luo_prog.run(m, body) == {"prepare": "ok"}
    env = {"LIVEUPDATE_MACHINE": str(Path(m.dir)), "PATH": "/usr/bin:/bin"}
    luoctl = [sys.executable, "-m", "liveupdate.cli.luoctl"]
    r = subprocess.run([*luoctl, "kho", "status", "--json"], capture_output=True, text=True,
                       env=env, timeout=60)
    status = json.loads(r.stdout)["luo"]
    assert status["state"] == "prepared"
    assert status["files"] == [{"token": "0x77", "compatible": "memfd-v1",
                                "state": "prepared", "data": status["files"][0]["data"]}]
    r = subprocess.run([*luoctl, "kho", "status"], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 0 and "prepared" in r.stdout and "memfd-v1" in r.stdout
    r = subprocess.run([*luoctl, "kho", "inspect", "--finalize", "--json"], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    luo_sub = next(s for s in rep["subtrees"] if s["name"] == "LUO")["content"]
    assert luo_sub["kind"] == "luo-v3"
    (entry,) = luo_sub["files"]["files"]
    assert entry["token"] == "0x77" and entry["compatible"] == "memfd-v1"
    assert entry["memfd"]["size"] == 4 << 20 and entry["memfd"]["folios"]["count"] == 2
    assert luo(m)["state"] == "prepared"  # inspecting changed nothing
