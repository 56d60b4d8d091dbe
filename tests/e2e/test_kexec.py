"""Conformance across real kexecs of the emulated machine (spec/kho.md 7)."""

from __future__ import annotations

import errno
import os
import select
import sys
from pathlib import Path

import pytest

from liveupdate.abi import image, kho, khotest
from liveupdate.abi.physmem import PhysMem
from liveupdate.errors import LiveUpdateError
from liveupdate.machine.client import RemoteRam
from liveupdate.tools import report
from tests.e2e.conftest import Factory


def test_three_kexecs_carry_state(machine: Factory) -> None:
    m = machine("kho=on test_kho=1 reserve_mem=4M:4096:trace")
    region = m.kho_status()["reserve_mem"][0]
    start = int(region["start"], 16)
    boot_ids = {m.status()["kernel"]["boot_id"]}
    for hop in range(3):
        m.ram_write(start + 4096 * hop, f"hop {hop}".encode())
        off = m.status()["console_bytes"]
        st = m.kexec()
        boot_ids.add(st["kernel"]["boot_id"])
        m.wait("KHO restore succeeded", offset=off)
        rm = m.kho_status()["reserve_mem"][0]
        assert rm["revived"] and int(rm["start"], 16) == start
        for seen in range(hop + 1):
            assert m.ram_read(start + 4096 * seen, 5) == f"hop {seen}".encode()
    assert len(boot_ids) == 4 and m.status()["boot_count"] == 4


def test_the_next_kernel_process_starts_when_an_image_is_loaded(machine: Factory) -> None:
    """The machine starts the next kernel's process when the kernel loads a kexec image --
    not at every boot -- and the jump uses that one."""
    m = machine("kho=on")
    assert m.status()["spare_pid"] is None
    m.kexec_load()
    spare = m.status()["spare_pid"]
    assert spare is not None
    m.kexec_load()  # a second load of the same kernel keeps it
    assert m.status()["spare_pid"] == spare
    st = m.kexec_exec()
    assert st["kernel_pid"] == spare and st["spare_pid"] is None


@pytest.mark.parametrize("sanitize, verdict", [("on", "caught"), ("off", "not caught")])
def test_sanitizer_catches_the_cheat(machine: Factory, sanitize: str, verdict: str) -> None:
    m = machine(f"kho=on kho_cheat=1 kho_sanitize={sanitize}")
    off = m.status()["console_bytes"]
    m.kexec()
    line = m.wait(r"kho_cheat: unpreserved page \S+ .*", offset=off)["line"]
    assert line.endswith(f": {verdict}") or line.endswith(f"({verdict})"), line


@pytest.mark.parametrize("kind, reason", [
    ("root_fdt", "totalsize 0x7fffffff exceeds"),
    ("compatible", "not kho-v1"),
    ("map_outside_ram", "outside RAM"),
    ("chunk_loop", "loops back"),
    ("num_elms", "num_elms 256 > 255"),
    ("bitmap_outside_ram", "bitmap at"),
])
def test_bad_handover_boots_cold(machine: Factory, kind: str, reason: str) -> None:
    m = machine(f"kho=on test_kho=1 kho_corrupt={kind}")
    off = m.status()["console_bytes"]
    st = m.kexec(cmdline="kho=on test_kho=1")
    assert not st["kernel"]["kho_boot"]
    line = m.wait("KHO: setup: .*", offset=off)["line"]
    assert reason in line, line
    m.wait(r"KHO: disabling KHO revival: -\d+\n", offset=off)  # with its errno, as Linux
    m.wait("test_kho: preserved", offset=off)  # cold path: a fresh save, no restore
    assert m.kho_status()["enabled"]


@pytest.mark.parametrize("quirks", ["broken_child+fdt_total", "fdt_2page"])
def test_what_linux_writes_revives(machine: Factory, quirks: str) -> None:
    """Linux's own output is never refused: zero-size scratch entries (this 1 GiB machine's
    global area is 0 in scale mode, as on Linux), a root FDT size other than one page, root
    children without a usable ``fdt`` that no one retrieves."""
    m = machine(f"kho=on test_kho=1 kho_quirks={quirks}")
    sent = m.kho_status()["out"]["scratch"]
    assert [a["size"] for a in sent].count(0) == 1
    off = m.status()["console_bytes"]
    st = m.kexec(cmdline="kho=on test_kho=1")
    assert st["kernel"]["kho_boot"]
    m.wait("KHO restore succeeded", offset=off)
    got = m.kho_status()["in"]
    assert got["scratch"] == sent
    broken = sorted(b["name"] for b in got["unretrievable"])
    assert broken == (["nofdt", "short"] if "broken_child" in quirks else [])
    assert [s["name"] for s in got["subtrees"]] == ["kho_test"]


def test_userspace_ends_at_kexec_even_daemonized(machine: Factory) -> None:
    m = machine()
    daemon = ("import os,sys,time\n"
              "if os.fork(): sys.exit(0)\n"
              "os.setsid()\n"
              "if os.fork(): sys.exit(0)\n"
              "print(os.getpid(), flush=True)\n"
              "os.close(1); os.close(2)\n"
              "time.sleep(3600)\n")
    r = m.run([sys.executable, "-c", daemon])
    pid = int(r["stdout"].split()[0])
    fd = os.pidfd_open(pid)
    try:
        assert select.select([fd], [], [], 0)[0] == []  # alive
        m.kexec()
        assert select.select([fd], [], [], 30)[0] == [fd]  # it ended (pidfd readable)
    finally:
        os.close(fd)


def test_kexec_errors_reach_userspace(machine: Factory) -> None:
    m = machine()
    r = m.run([sys.executable, "-m", "liveupdate.userspace.kexec", "-e"])
    assert r["status"] == 1 and "no kexec image loaded" in r["stderr"]
    with open(os.path.join(m.dir, "disk", "images", "junk.img"), "wb") as f:
        f.write(b"junk")
    r = m.run([sys.executable, "-m", "liveupdate.userspace.kexec", "-l", "images/junk.img"])
    assert r["status"] == 1 and "ENOEXEC" in r["stderr"]
    assert m.status()["state"] == "running"


def test_init_services_and_debugfs(machine: Factory, tmp_path: Path) -> None:
    disk = tmp_path / "m0" / "disk"
    disk.mkdir(parents=True)
    (disk / "services").write_text(
        "# started by init at every boot\n"
        f"{sys.executable} -c 'print(\"service says hello\", flush=True)'\n")
    m = machine("kho=on test_kho=1")
    m.wait("service says hello")
    scratch = m.debugfs("out/scratch_phys").decode().split()
    assert scratch == [a["addr"] for a in m.kho_status()["out"]["scratch"]]
    assert m.debugfs("out/finalize") == b"0\n"
    off = m.status()["console_bytes"]
    m.kexec()
    m.wait("service says hello", offset=off)  # the new kernel's init starts it again
    root = kho.decode_root(m.debugfs("in/fdt"), require_map=True)
    assert [n for n, _ in root.subtrees] == ["kho_test"]
    sub = m.debugfs("in/sub_fdts/kho_test")
    assert khotest.decode(sub).nr_folios > 0
    with pytest.raises(LiveUpdateError) as e:
        m.debugfs("in/sub_fdts/nope")
    assert e.value.errno == errno.ENOENT


def test_616_bitmaps_round_trip_and_are_detected(machine: Factory, tmp_path: Path) -> None:
    images = tmp_path / "m0" / "disk" / "images"
    images.mkdir(parents=True)
    (images / "v616.img").write_bytes(
        image.KernelImage(release="6.16.0-lu", kho_bitmap_bytes=512, kho_core="6.16",
                          luo="none").encode())
    m = machine("kho=on test_kho=1", image="images/v616.img")
    off = m.status()["console_bytes"]
    st = m.kexec("images/v616.img")
    assert st["kernel"]["release"] == "6.16.0-lu" and st["kernel"]["kho_boot"]
    m.wait("KHO restore succeeded", offset=off)
    m.run([sys.executable, "-c", "from liveupdate.client.syscall import Kernel; "
           "Kernel().debugfs_write('out/finalize', b'1')"])
    mem = PhysMem(RemoteRam(m, m.status()["memory"]))
    rep = report.describe(m.debugfs("out/fdt"), mem)  # size detected, not told
    assert rep["memory"]["bitmap_bytes"] == 512
    assert rep["memory"]["pages"] == m.kho_status()["out"]["preserved_pages"]


def test_a_next_kernel_that_cannot_start_is_a_panic_not_a_silent_machine(
        machine: Factory, tmp_path: Path) -> None:
    """An image whose code the machine cannot run (its template does not import): the spare
    is not made (said on the console), and the jump ends in PANIC with the reason -- the
    machine keeps answering."""
    m = machine("kho=on")
    (tmp_path / "m0" / "disk" / "images" / "ghost.img").write_bytes(
        image.KernelImage(entry="liveupdate.no_such_kernel").encode())
    off = m.status()["console_bytes"]
    m.kexec_load("images/ghost.img")
    m.wait(r"machine: no spare kernel for liveupdate\.no_such_kernel", offset=off)
    with pytest.raises(LiveUpdateError) as e:
        m.kexec_exec(timeout=30)
    assert e.value.errno == errno.EIO
    st = m.status()
    assert st["state"] == "panic" and "jump to liveupdate.no_such_kernel" in st["reason"]
