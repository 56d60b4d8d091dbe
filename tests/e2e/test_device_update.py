"""A passthrough device across a real kexec of ``7.3+posted`` (issue #25), by real processes:
a program maps a sealed memfd into an IOAS, assigns the NIC, gives it a ring in the memfd and
preserves memfd, iommufd (a marked HWPT) and the device in one LUO session; the next kernel's
program retrieves all three by token, binds and attaches the retrieved page table.

* continuous (``liveupdate_devices=continuous``): the NIC never stops -- the packets sent
  during the blackout are in the ring, in sequence, intact; no drop, no IOMMU fault, every DMA
  write inside the memfd's pages (which are the preserved ones: zero copy);
* as posted: the device is reset at freeze, so the packets of the blackout are lost (the gap
  in the sequence after re-initializing the device) and no DMA happens meanwhile;
* plain 7.3 refuses to preserve either file (ENOENT: no handler), as Linux 7.3 does.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from liveupdate.abi.physmem import PhysMem
from liveupdate.machine.client import MachineClient, RemoteRam, start
from liveupdate.machine.nic import DESC, check_packet
from liveupdate.tools import report
from tests.e2e import luo_prog
from tests.e2e.conftest import IMAGES

BDF = "00:03.0"
BASE = "kho=on liveupdate=on intel_iommu=on vfio-pci.ids=1b36:11b0"
RATE = 500  # packets per second: 4096 descriptors last 8 s
SIZE, ENTRIES, BUFS, BUF = 4 << 20, 4096, 0x10000, 64

PRELUDE = r'''
import json, os, signal, struct, sys
from liveupdate.client.backends import EmulatedBackend
from liveupdate.client.device import LiveUpdate
from liveupdate.client.devices import Iommufd, VfioDevice
from liveupdate.errors import LiveUpdateError
b = EmulatedBackend()
k = b.k
SIZES

def ring():
    return b"".join(struct.pack("<QHHB3x", BUFS + BUF * i, BUF, 0, 0) for i in range(ENTRIES))

def start_nic(dev):
    dev.config_write(4, 2, dev.config_read(4, 2) | 0x6)  # memory space, bus master
    for off, v in ((0x08, 0), (0x0C, 0), (0x10, ENTRIES), (0x00, 1)):
        dev.bar_write(off, v)
'''.replace("SIZES", f"SIZE, ENTRIES, BUFS, BUF = {SIZE}, {ENTRIES}, {BUFS}, {BUF}") + luo_prog.HOLD

SETUP = r'''
lu = LiveUpdate(b)
s = lu.create_session("vm0")
mfd = k.memfd_create("guest", 0x2)
k.ftruncate(mfd, SIZE)
k.add_seals(mfd, 0x7)
k.pwrite(mfd, ring(), 0)
iommufd = Iommufd(b)
ioas = iommufd.ioas_alloc()
iommufd.map_file(ioas, mfd, 0, SIZE, iova=0)   # IOVA = the memfd's offset ("guest physical")
dev = VfioDevice(b, "/dev/vfio/devices/vfio0")
hwpt = iommufd.hwpt_alloc(dev.bind(iommufd.fd), ioas)
dev.attach(hwpt)
out = {"mark": "ok"}
try:
    iommufd.mark_preserve(hwpt, 0x1D)   # the posted series' command
except LiveUpdateError as e:
    out["mark"] = e.errno_name
start_nic(dev)
for token, fd in ((1, mfd), (2, iommufd.fd), (3, dev.fd)):
    try:
        s.preserve_fd(fd, token)
        out[token] = "ok"
    except LiveUpdateError as e:
        out[token] = e.errno_name
out["extents"] = k.extents(mfd, SIZE)
hold(out)
'''

RESUME = r'''
lu = LiveUpdate(b)
s = lu.retrieve_session("vm0")
mfd, ifd, dfd = (s.retrieve_fd(t) for t in (1, 2, 3))
dev = VfioDevice(b, fd=dfd)
out = {"plain_open": None}
try:
    VfioDevice(b, "/dev/vfio/devices/vfio0")
except LiveUpdateError as e:
    out["plain_open"] = e.errno_name
dev.bind(ifd)
out["attached"] = dev.attach(1)   # the retrieved iommufd's HWPT 1: the preserved table
out["ring"] = k.pread(mfd, 16 * ENTRIES, 0).hex()
if REINIT:  # as posted: the device was reset; the VMM gives it its ring again
    k.pwrite(mfd, ring(), 0)
    start_nic(dev)
    for _ in range(1 << 22):  # until the first packet after the re-initialization
        if k.pread(mfd, 1, 12)[0] & 1:
            break
    out["after"] = k.pread(mfd, 16, 0).hex()
out["bufs"] = k.pread(mfd, BUF * ENTRIES, BUFS).hex()
s.finish()
out["extents"] = k.extents(mfd, SIZE)
if AGAIN:  # the next update: the same three files into a new session
    s = lu.create_session("vm0")
    out["again"] = []
    for token, fd in ((1, mfd), (2, ifd), (3, dfd)):
        try:
            s.preserve_fd(fd, token)
            out["again"].append("ok")
        except LiveUpdateError as e:
            out["again"].append(e.errno_name)
hold(out)
'''


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[Any]:
    running: list[Any] = []

    def make(mode: str, gen: str = "7.3+posted") -> MachineClient:
        folder = tmp_path / f"m{len(running)}"
        images = folder / "disk" / "images"
        images.mkdir(parents=True)
        (images / "next.img").write_bytes(IMAGES[gen].encode())
        proc, m = start(str(folder), memory=1 << 30, image="images/next.img",
                        cmdline=f"{BASE} liveupdate_devices={mode}", log=f"{folder}.log",
                        devices=[{"kind": "nic", "bdf": BDF, "rate": RATE}])
        running.append((proc, m))
        m.booted(60)
        return m

    yield make
    for proc, m in running:
        m.shutdown()
        proc.wait(30)


def run(m: MachineClient, body: str) -> Any:
    r = m.run([sys.executable, "-c", PRELUDE + body], timeout=120)
    assert r["status"] == 0, r["stderr"][-4000:]
    return json.loads(r["stdout"].strip().splitlines()[-1])


def seqs(ring: bytes, bufs: bytes) -> list[int]:
    """The sequence numbers of the done descriptors, in ring order; each packet checked."""
    out = []
    for i in range(ENTRIES):
        buf, _, length, flags = DESC.unpack_from(ring, 16 * i)
        if not flags & 1:
            break
        at = buf - BUFS
        out.append(check_packet(bufs[at : at + length]))
    return out


def inspect_flbs(m: MachineClient, st: dict[str, Any]) -> dict[str, Any]:
    mem = PhysMem(RemoteRam(m, st["memory"]))
    root = report.describe(m.debugfs("in/fdt"), mem)
    luo = next(s for s in root["subtrees"] if s["name"] == "LUO")["content"]
    assert report.errors(luo) == []
    return {f["name"]: f["decoded"] for f in luo["flbs"]["list"] if "decoded" in f}


def inside(log: list[tuple[int, int]], extents: list[list[int]]) -> bool:
    return all(any(p <= a and a + n <= p + size for p, size in extents) for a, n in log)


def test_continuous_the_nic_never_stops(machine: Any) -> None:
    m = machine("continuous")
    log0 = m.status()["devices"]["iommu"]["dma_writes"]
    setup = run(m, SETUP)
    assert [setup[t] for t in "123"] == ["ok"] * 3
    before = m.status()["devices"]["functions"][0]
    m.kexec_load("images/next.img")  # the same command line, with its mode
    st = m.kexec_exec()
    at_jump = st["devices"]["functions"][0]
    assert at_jump["bus_master"] and st["devices"]["iommu"]["enabled"]
    m.wait(r"DMAR: took over the preserved root table")
    flbs = inspect_flbs(m, st)  # the handover as luoctl inspect decodes it, through RAM
    assert [d["bdf"] for d in flbs["pci"]["devices"]] == ["0x0018"]
    iommu = flbs["iommu-liveupdate"]
    assert iommu["units"][0]["root_table"] == st["devices"]["iommu"]["root"]
    assert [d["devid"] for d in iommu["devices"]] == ["0x0018"]
    assert iommu["domains"][0]["top_level"] == 3 and iommu["domains"][0]["vasz"] == 48
    out = run(m, RESUME.replace("REINIT", "False").replace("AGAIN", "True"))
    assert out["plain_open"] == "EBUSY" and out["attached"] == 1
    got = seqs(bytes.fromhex(out["ring"]), bytes.fromhex(out["bufs"]))
    assert got == list(range(got[0], got[0] + len(got)))  # in order, none missing
    fn = m.status()["devices"]["functions"][0]
    # none dropped since the ring was given (the few before it, after bind's reset, count)
    assert fn["drops"] == before["drops"] and fn["dma_errors"] == 0
    assert at_jump["delivered"] > before["delivered"]  # packets landed during the update
    assert m.status()["devices"]["iommu"]["faults"] == 0
    assert out["extents"] == setup["extents"]  # the same pages: nothing copied
    assert inside(m.dma_log()[log0:], setup["extents"])
    assert out["again"] == ["ok"] * 3

    # a second update: the taken-over tables are preserved again, the NIC still running
    m.kexec_load("images/next.img")  # the same command line, with its mode
    st = m.kexec_exec()
    assert st["devices"]["functions"][0]["bus_master"]
    second = run(m, RESUME.replace("REINIT", "False").replace("AGAIN", "False"))
    got2 = seqs(bytes.fromhex(second["ring"]), bytes.fromhex(second["bufs"]))
    assert got2[: len(got)] == got and got2 == list(range(got2[0], got2[0] + len(got2)))
    assert len(got2) > len(got)  # the ring kept filling through the second kexec
    fn = m.status()["devices"]["functions"][0]
    assert fn["drops"] == before["drops"] and m.status()["devices"]["iommu"]["faults"] == 0
    assert second["extents"] == setup["extents"]
    assert inside(m.dma_log()[log0:], setup["extents"])


def test_as_posted_dma_stops_for_the_blackout(machine: Any) -> None:
    m = machine("posted")
    setup = run(m, SETUP)
    assert [setup[t] for t in "123"] == ["ok"] * 3
    m.kexec_load("images/next.img")  # the same command line, with its mode
    st = m.kexec_exec()
    m.wait(r"vfio-pci 0000:00:03\.0: reset at freeze")
    assert not st["devices"]["functions"][0]["bus_master"]
    log_at_jump = st["devices"]["iommu"]["dma_writes"]
    out = run(m, RESUME.replace("REINIT", "True").replace("AGAIN", "False"))
    last_before = seqs(bytes.fromhex(out["ring"]), bytes.fromhex(out["bufs"]))[-1]
    first_after = check_packet(bytes.fromhex(out["bufs"])[:60])
    assert DESC.unpack(bytes.fromhex(out["after"]))[3] & 1
    assert first_after - last_before - 1 > 0  # the gap: what the blackout lost
    assert m.status()["devices"]["iommu"]["faults"] == 0
    assert inside(m.dma_log()[log_at_jump:], setup["extents"])


def test_plain_7_3_has_no_handler(machine: Any) -> None:
    m = machine("posted", gen="7.3")
    out = run(m, SETUP)
    assert (out["mark"], out["2"], out["3"]) == ("ENOTTY", "ENOENT", "ENOENT")
