"""luoctl inspect from what a user holds: the sysfs setup_data payload, RAM with no
setup_data at all (the root found by scanning), and the choice among several roots."""

from __future__ import annotations

import struct
from pathlib import Path

import libfdt
import pytest

from liveupdate.abi import bootparams, kho, luo_ser
from liveupdate.errors import AbiError
from liveupdate.scenario import capture
from liveupdate.tools import report
from tests.tools.cli import inspect


def _kd(cap: Path) -> bootparams.KhoData:
    return bootparams.KhoData.decode((cap / "setup_data.bin").read_bytes()[16:])


def test_sysfs_payload_decodes_like_the_whole_node(cap72: Path, tmp_path: Path) -> None:
    payload = tmp_path / "data"  # what /sys/kernel/boot_params/setup_data/N/data holds
    payload.write_bytes((cap72 / "setup_data.bin").read_bytes()[16:])
    rc, node, err = inspect("--ram", str(cap72 / "ram.img"), str(cap72 / "setup_data.bin"))
    assert rc == 0, err
    rc, bare, err = inspect("--ram", str(cap72 / "ram.img"), str(payload))
    assert rc == 0, err
    assert bare.pop("form").startswith("kho_data payload") and node.pop("next") == "0x0"
    assert bare == node
    rc, alone, _ = inspect(str(payload))
    assert rc == 0 and alone["kho_data"] == node["kho_data"] and "root" not in alone


def test_32_bytes_are_told_apart_by_content() -> None:
    ser = luo_ser.encode(luo_ser.LuoSer(3, 0x2BE000, 0x1F7000))
    kd = bootparams.KhoData(0x1FE000, 4096, 0x3EFF0000, 48).encode()
    assert len(ser) == len(kd) == 32
    assert report.identify(ser) == "luo-v5" and report.identify(kd) == "setup_data"
    for junk in (bytes(32), struct.pack("<QQQQ", 0x1FE001, 4096, 0x3EFF0000, 48),
                 struct.pack("<QQQQ", 0x1FE000, 4096, 0x3EFF0000, 40)):
        with pytest.raises(AbiError, match="32 bytes: not a KHO root FDT"):
            report.identify(junk)


@pytest.mark.parametrize("ram", ["ram.img", "ram.elf"])
def test_scan_finds_the_root_setup_data_points_at(cap72: Path, ram: str) -> None:
    rc, via_sd, err = inspect("--ram", str(cap72 / ram), str(cap72 / "setup_data.bin"))
    assert rc == 0, err
    rc, scanned, err = inspect("--ram", str(cap72 / ram))
    assert rc == 0, err
    assert scanned["chosen"] == f"{_kd(cap72).fdt_addr:#x}"
    assert scanned["root"] == via_sd["root"]
    assert [c["phys"] for c in scanned["candidates"]] == [scanned["chosen"]]
    assert scanned["candidates"][0]["self_preserved"] is True
    assert "only KHO root" in scanned["why"]
    # kho_test's FDT is found too, and is not a candidate
    assert {"phys": report.hx(int(next(s["preserved_data"] for s in via_sd["root"]["subtrees"]
                                       if s["name"] == "kho_test"), 16)),
            "compatible": "kho-test-v1"} in scanned["other_fdts"]["list"]


FREE = 0x3000_0000  # RAM the captured kernel never touched


def _fresh(tmp: Path) -> tuple[Path, int, bytes]:
    """A fresh 7.2 capture: its RAM, the root's phys and the root page."""
    capture.capture("7.2", "7.2", tmp)
    root = _kd(tmp).fdt_addr
    with open(tmp / "ram.img", "rb") as f:
        f.seek(root)
        return tmp / "ram.img", root, f.read(4096)


def _put(ram: Path, phys: int, data: bytes) -> None:
    with open(ram, "r+b") as f:
        f.seek(phys)
        f.write(data)


def test_a_stale_copy_whose_map_is_gone_loses(tmp_path: Path) -> None:
    ram, root, page = _fresh(tmp_path)
    copy = libfdt.Fdt(bytearray(page[: struct.unpack(">I", page[4:8])[0]]))
    copy.setprop(0, kho.MEM_MAP_PROP, struct.pack("<Q", FREE + 4096))  # same size: in place
    _put(ram, FREE + 4096, bytes(range(256)) * 16)  # a reused page: wild node pointers
    _put(ram, FREE, bytes(copy.as_bytearray()))
    rc, rep, err = inspect("--ram", str(ram))
    assert rc == 0, err
    assert rep["chosen"] == f"{root:#x}" and len(rep["candidates"]) == 2
    stale = next(c for c in rep["candidates"] if c["phys"] == f"{FREE:#x}")
    assert "does not decode" in stale["rejected"] and "KHO radix" in stale["rejected"]
    assert "the only one of 2" in rep["why"]


def test_a_copy_loses_to_the_root_whose_map_preserves_it(tmp_path: Path) -> None:
    ram, root, page = _fresh(tmp_path)
    _put(ram, FREE, page)
    rc, rep, err = inspect("--ram", str(ram))
    assert rc == 0, err
    # both maps decode (they are the same map), which preserves the real root's page only
    assert rep["chosen"] == f"{root:#x}" and "preserves its own page" in rep["why"]
    assert [c["self_preserved"] for c in rep["candidates"]] == [True, False]
    rc, picked, err = inspect("--ram", str(ram), "--root", f"{FREE:#x}")
    assert rc == 0, err
    assert picked["chosen"] == f"{FREE:#x}" and picked["why"] == "given with --root"
    assert picked["root"] == rep["root"]


def test_indistinguishable_roots_are_reported_as_ambiguous(tmp_path: Path) -> None:
    ram, root, page = _fresh(tmp_path)
    _put(ram, FREE + 0x10000, page)
    _put(ram, FREE, page)
    _put(ram, root, bytes(4096))
    rc, rep, err = inspect("--ram", str(ram))
    assert rc == 0, err
    assert rep["chosen"] == f"{FREE:#x}" and "AMBIGUOUS" in rep["why"]
    assert "--root" in rep["why"]


def test_no_root_in_ram_is_one_clear_error(tmp_path: Path) -> None:
    ram = tmp_path / "ram"
    with open(ram, "wb") as f:
        f.truncate(64 << 20)
    rc, rep, err = inspect("--ram", str(ram))
    assert rc == 1 and "no KHO root FDT in RAM" in rep["error"]
    assert err.startswith("luoctl: error: /: no KHO root FDT") and "Traceback" not in err
