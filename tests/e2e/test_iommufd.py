"""``/dev/iommu`` and the VFIO device cdev on an emulated machine, by real processes through
the client library: a memfd mapped into an IOAS by file, a NIC bound and attached, and the
device's DMA landing in the memfd's own pages at the IOVA the process chose (read back from
the machine's RAM and its DMA log); then the errno of each refusal, and what close does.

One machine (IOMMU on, the NIC claimed by vfio-pci) serves every case; each case leaves it
as it found it (its process exits: every file closed, the device unbound and reset)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from liveupdate.machine.client import MachineClient, start
from liveupdate.machine.nic import DESC, check_packet
from tests.e2e.conftest import IMAGES

BDF = "00:03.0"
CMDLINE = "kho=on liveupdate=on intel_iommu=on vfio-pci.ids=1b36:11b0"
pytestmark = pytest.mark.xdist_group("iommufd")

PRELUDE = r'''
import errno, json, os, struct
from liveupdate.abi import devices_uapi as du
from liveupdate.client.backends import EmulatedBackend
from liveupdate.client.devices import Iommufd, VfioDevice, ioctl
from liveupdate.errors import LiveUpdateError
b = EmulatedBackend()
k = b.k

def err(fn, *a, **kw):
    try:
        fn(*a, **kw)
    except LiveUpdateError as e:
        return e.errno_name
    return "ok"

def raw(fd, name, data):
    buf = bytearray(data)
    try:
        k.ioctl(fd, du.cmd(name).number, buf)
    except LiveUpdateError as e:
        return e.errno_name
    return bytes(buf).hex()
'''


@pytest.fixture(scope="module")
def m(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MachineClient]:
    folder = tmp_path_factory.mktemp("iommufd") / "m"
    images = folder / "disk" / "images"
    images.mkdir(parents=True)
    (images / "posted.img").write_bytes(IMAGES["7.3+posted"].encode())
    proc, client = start(str(folder), memory=1 << 30, cmdline=CMDLINE,
                         image="images/posted.img", log=f"{folder}.log",
                         devices=[{"kind": "nic", "bdf": BDF, "rate": 2000}])
    try:
        client.booted(60)
        yield client
    finally:
        client.shutdown()
        proc.wait(30)


def run(m: MachineClient, body: str) -> Any:
    r = m.run([sys.executable, "-c", PRELUDE + body], timeout=120)
    assert r["status"] == 0, r["stderr"][-4000:]
    return json.loads(r["stdout"].strip().splitlines()[-1])


def nic(m: MachineClient) -> dict[str, Any]:
    fn: dict[str, Any] = m.status()["devices"]["functions"][0]
    return fn


RING_IOVA = 0x200000
DMA = r'''
mfd = k.memfd_create("guest", 0x2)
k.ftruncate(mfd, 4 << 20)
k.add_seals(mfd, 0x1 | 0x2 | 0x4)   # F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW
ring, bufs = 0x200000, 0x210000
k.pwrite(mfd, b"".join(struct.pack("<QHHB3x", bufs + 256 * i, 256, 0, 0)
                       for i in range(64)), ring)
iommufd = Iommufd(b)
ioas = iommufd.ioas_alloc()
iova = iommufd.map_file(ioas, mfd, 0, 4 << 20, iova=0)
dev = VfioDevice(b, "/dev/vfio/devices/vfio0")
dev_id = dev.bind(iommufd.fd)
hwpt = iommufd.hwpt_alloc(dev_id, ioas)
attached = dev.attach(hwpt)
regs = {r: dev.region_info(r) for r in (0, 7)}
ids = dev.config_read(0, 4)
dev.config_write(4, 2, dev.config_read(4, 2) | 0x4)   # bus master on
for off, v in ((0x08, ring), (0x0C, 0), (0x10, 64), (0x00, 1)):
    dev.bar_write(off, v)
for _ in range(1 << 20):  # until the device wrote descriptor 0 (DD), whatever the load
    if k.pread(mfd, 1, ring + 12)[0] & 1:
        break
landed = {"ring": k.pread(mfd, 16, ring).hex(), "buf": k.pread(mfd, 64, bufs).hex()}
extents = k.extents(mfd, 4 << 20)
info = dev.info()
dev.close()
iommufd.close()
k.uname()  # the kernel sees the closes before it serves the next call
print(json.dumps({"ioas": ioas, "iova": iova, "dev_id": dev_id, "hwpt": hwpt,
                  "attached": attached, "ids": ids, "info": info, "landed": landed,
                  "regions": regs, "extents": extents}))
'''


def test_a_device_dmas_into_the_memfd_at_the_iova_the_process_mapped(m: MachineClient
                                                                      ) -> None:
    m.wait(r"vfio-pci 0000:00:03\.0: /dev/vfio/devices/vfio0 \(BAR0 0x1000 bytes\)")
    log0 = m.status()["devices"]["iommu"]["dma_writes"]
    # the program programs the device, waits for a packet, closes: unbound, bus master off
    out = run(m, DMA)
    assert out["ids"] == 0x11B01B36 and out["attached"] == out["hwpt"]
    assert out["ioas"] == 1 and out["dev_id"] == 2 and out["hwpt"] == 3 and out["iova"] == 0
    assert out["info"]["num_regions"] == 9 and out["info"]["flags"] == 3
    assert out["regions"]["0"]["region_size"] == 0x1000
    assert out["regions"]["7"]["offset"] == 7 << 40
    after = nic(m)
    assert not after["bus_master"] and after["ctrl"] == 0  # close: disabled and reset
    log = m.dma_log()[log0:]  # a packet and its descriptor each
    assert log and len(log) % 2 == 0, out["extents"]
    phys = [(p, n) for p, n in out["extents"]]

    def to_phys(iova: int) -> int:
        at = 0
        for p, n in phys:
            if at <= iova < at + n:
                return int(p) + iova - at
            at += n
        raise AssertionError(iova)

    inside = [(p, p + n) for p, n in phys]
    assert all(any(lo <= p and p + n <= hi for lo, hi in inside) for p, n in log)
    # what landed is intact, in the memfd's own pages at the IOVAs the process chose
    desc = DESC.unpack(bytes.fromhex(out["landed"]["ring"]))
    assert desc[3] & 1 and desc[2] == 60 and desc[0] == RING_IOVA + 0x10000
    assert check_packet(bytes.fromhex(out["landed"]["buf"])[:60]) >= 0
    assert m.ram_read(to_phys(RING_IOVA), 16) == bytes.fromhex(out["landed"]["ring"])
    assert m.status()["devices"]["iommu"]["faults"] == 0


ERRNOS = r'''
out = {}
iommufd = Iommufd(b)
ioas = iommufd.ioas_alloc()
mfd = k.memfd_create("m", 0)
k.ftruncate(mfd, 1 << 20)
out["alloc_flags"] = err(ioctl, b, iommufd.fd, "IOMMU_IOAS_ALLOC", flags=1)
out["unknown_ioas"] = err(iommufd.map_file, 99, mfd, 0, 4096)
out["unaligned"] = err(iommufd.map_file, ioas, mfd, 0, 100)
out["past_eof"] = err(iommufd.map_file, ioas, mfd, 0, 2 << 20)
out["no_prot"] = err(iommufd.map_file, ioas, mfd, 0, 4096, flags=0)
out["bad_flag"] = err(iommufd.map_file, ioas, mfd, 0, 4096, flags=0x8 | 6)
out["bad_fd"] = err(iommufd.map_file, ioas, 1000, 0, 4096)
out["not_memfd"] = err(iommufd.map_file, ioas, iommufd.fd, 0, 4096)
out["auto_iova"] = iommufd.map_file(ioas, mfd, 0, 8192)
out["overlap"] = err(iommufd.map_file, ioas, mfd, 0, 4096, iova=4096)
out["auto_iova2"] = iommufd.map_file(ioas, mfd, 0, 4096)
out["unmap_edge"] = err(iommufd.unmap, ioas, 0, 4096)
out["unmap_none"] = err(iommufd.unmap, ioas, 1 << 30, 4096)
out["unmap"] = iommufd.unmap(ioas, 0, 8192)
out["unmap_all"] = iommufd.unmap(ioas, 0, (1 << 64) - 1)
out["user_va"] = err(ioctl, b, iommufd.fd, "IOMMU_IOAS_MAP", ioas_id=ioas, flags=6, length=4096)
cmd = du.cmd("IOMMU_IOAS_ALLOC")
out["short"] = raw(iommufd.fd, "IOMMU_IOAS_ALLOC", struct.pack("<II", 8, 0))
out["e2big"] = raw(iommufd.fd, "IOMMU_IOAS_ALLOC", struct.pack("<IIII", 16, 0, 0, 1))
out["longer_zero"] = raw(iommufd.fd, "IOMMU_IOAS_ALLOC", struct.pack("<IIII", 16, 0, 0, 0))
bad = bytearray(8)
out["enotty"] = err(k.ioctl, iommufd.fd, 0x3b84, bad)
out["hwpt_no_dev"] = err(iommufd.hwpt_alloc, 77, ioas)
dev = VfioDevice(b, "/dev/vfio/devices/vfio0")
out["unbound_info"] = err(dev.info)
out["unbound_read"] = err(dev.config_read, 0, 4)
out["bind_bad_fd"] = err(dev.bind, 1000)
out["bind_not_iommufd"] = err(dev.bind, mfd)
out["bind_token"] = err(ioctl, b, dev.fd, "VFIO_DEVICE_BIND_IOMMUFD", iommufd=iommufd.fd,
                        flags=1)
dev_id = dev.bind(iommufd.fd)
out["bind_twice"] = err(dev.bind, iommufd.fd)
other = VfioDevice(b, "/dev/vfio/devices/vfio0")
out["bind_other"] = err(other.bind, iommufd.fd)
out["bind_short"] = raw(other.fd, "VFIO_DEVICE_BIND_IOMMUFD", struct.pack("<III", 12, 0, 0))
out["hwpt_flags"] = err(ioctl, b, iommufd.fd, "IOMMU_HWPT_ALLOC", dev_id=dev_id, pt_id=ioas,
                        flags=2)
out["hwpt_reserved"] = err(ioctl, b, iommufd.fd, "IOMMU_HWPT_ALLOC", dev_id=dev_id,
                           pt_id=ioas, reserved=1)
out["hwpt_data"] = err(ioctl, b, iommufd.fd, "IOMMU_HWPT_ALLOC", dev_id=dev_id, pt_id=ioas,
                       data_len=8)
out["attach_unknown"] = err(dev.attach, 99)
out["attach_pasid"] = err(ioctl, b, dev.fd, "VFIO_DEVICE_ATTACH_IOMMUFD_PT", pt_id=ioas,
                          flags=1)
auto = dev.attach(ioas)
out["auto_is_hwpt"] = auto != ioas
out["destroy_busy_ioas"] = err(iommufd.destroy, ioas)
out["destroy_busy_hwpt"] = err(iommufd.destroy, auto)
out["destroy_dev"] = err(iommufd.destroy, dev_id)
out["destroy_unknown"] = err(iommufd.destroy, 1234)
out["attach_other"] = err(dev.attach, iommufd.hwpt_alloc(dev_id, ioas))
out["region_bad"] = err(dev.region_info, 9)
out["bar_unaligned"] = err(dev.read, 0, 2, 4)
out["reset"] = err(dev.reset)
dev.detach()
out["destroy_after"] = err(iommufd.destroy, ioas)
out["enotty_vfio"] = err(k.ioctl, dev.fd, 0x3b70, bytearray(8))
print(json.dumps(out))
'''


def test_errnos(m: MachineClient) -> None:
    out = run(m, ERRNOS)
    assert out == {
        "alloc_flags": "ENOTSUP", "unknown_ioas": "ENOENT", "unaligned": "EINVAL",
        "past_eof": "EINVAL", "no_prot": "EINVAL", "bad_flag": "ENOTSUP",
        "bad_fd": "EBADF", "not_memfd": "EINVAL", "auto_iova": 0, "overlap": "EEXIST",
        "auto_iova2": 8192, "unmap_edge": "ENOENT", "unmap_none": "ENOENT", "unmap": 8192,
        "unmap_all": 4096, "user_va": "ENOTSUP", "short": "EINVAL", "e2big": "E2BIG",
        "longer_zero": out["longer_zero"],
        "enotty": "ENOTTY", "hwpt_no_dev": "ENOENT", "unbound_info": "EINVAL",
        "unbound_read": "EINVAL", "bind_bad_fd": "EBADF", "bind_not_iommufd": "EBADFD",
        "bind_token": "EINVAL", "bind_twice": "EINVAL", "bind_other": "EINVAL",
        "bind_short": "EINVAL", "hwpt_flags": "ENOTSUP", "hwpt_reserved": "ENOTSUP",
        "hwpt_data": "EINVAL", "attach_unknown": "ENOENT", "attach_pasid": "ENOTSUP",
        "auto_is_hwpt": True, "destroy_busy_ioas": "EBUSY", "destroy_busy_hwpt": "EBUSY",
        "destroy_dev": "EBUSY", "destroy_unknown": "ENOENT", "attach_other": "EINVAL",
        "region_bad": "EINVAL", "bar_unaligned": "EINVAL", "reset": "ok",
        "destroy_after": "EBUSY", "enotty_vfio": "ENOTTY"}
    # a longer struct with a zero tail is zero-extended; the reply is as long as the user's
    assert len(bytes.fromhex(out["longer_zero"])) == 16


def test_open_needs_root_and_the_nodes_exist(m: MachineClient) -> None:
    body = r'''
out = {"vfio1": err(k.open, "/dev/vfio/devices/vfio1")}
os.setuid(1000)
out["iommu_user"] = err(k.open, "/dev/iommu")
print(json.dumps(out))
'''
    assert run(m, body) == {"vfio1": "ENOENT", "iommu_user": "EACCES"}


UNPRESERVE = r'''
from liveupdate.client.device import LiveUpdate
out = {}
lu = LiveUpdate(b)
mfd = k.memfd_create("guest", 0x2)
k.ftruncate(mfd, 1 << 20)
iommufd = Iommufd(b)
ioas = iommufd.ioas_alloc()
dev = VfioDevice(b, "/dev/vfio/devices/vfio0")
hwpt = iommufd.hwpt_alloc(dev.bind(iommufd.fd), ioas)
dev.attach(hwpt)
iommufd.map_file(ioas, mfd, 0, 1 << 20, iova=0)
s = lu.create_session("u")
out["no_mark"] = err(s.preserve_fd, iommufd.fd, 2)
out["mark_twice"] = [err(iommufd.mark_preserve, hwpt, 5), err(iommufd.mark_preserve, hwpt, 5)]
out["unsealed"] = err(s.preserve_fd, iommufd.fd, 2)
out["vfio_first"] = err(s.preserve_fd, dev.fd, 3)
iommufd.unmap(ioas, 0, 1 << 20)
k.add_seals(mfd, 0x7)
iommufd.map_file(ioas, mfd, 0, 1 << 20, iova=0)
out["memfd_not_preserved"] = err(s.preserve_fd, iommufd.fd, 2)
s.preserve_fd(mfd, 1)
out["iommufd"] = err(s.preserve_fd, iommufd.fd, 2)
out["map_immutable"] = err(iommufd.map_file, ioas, mfd, 0, 4096, iova=1 << 30)
out["vfio"] = err(s.preserve_fd, dev.fd, 3)
s2 = lu.create_session("v")
out["vfio_again"] = err(s2.preserve_fd, dev.fd, 4)
s.close()
s2.close()
k.uname()  # the closes are seen: everything unpreserved
out["map_after"] = err(iommufd.map_file, ioas, mfd, 0, 4096, iova=1 << 30)
print(json.dumps(out))
'''


def test_preserve_refusals_and_unpreserve(m: MachineClient) -> None:
    before = m.kho_status()
    out = run(m, UNPRESERVE)
    assert out == {"no_mark": "EINVAL", "mark_twice": ["ok", "EADDRINUSE"],
                   "unsealed": "EINVAL", "vfio_first": "EINVAL",
                   "memfd_not_preserved": "ENOENT", "iommufd": "ok",
                   "map_immutable": "EBUSY", "vfio": "ok", "vfio_again": "EBUSY",
                   "map_after": "ok"}
    assert m.kho_status()["out"]["preserved_pages"] == before["out"]["preserved_pages"]
