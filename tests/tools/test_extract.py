"""luoctl inspect --extract: preserved memfds written out, sparse, with a manifest; hostile
handovers refused before anything is written."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from liveupdate.abi import bootparams, kho, luo_ser, memfd, vmalloc
from liveupdate.abi.physmem import PhysMem
from liveupdate.tools import extract, generations
from tests.tools.cli import inspect
from tests.tools.conftest import write_example


def _manifest(out: Path) -> list[dict[str, Any]]:
    files: list[dict[str, Any]] = json.loads((out / "manifest.json").read_text())["files"]
    return files


@pytest.mark.parametrize("cap, ram, compatible", [
    ("cap72", "ram.img", "memfd-v2"), ("cap72", "ram.elf", "memfd-v2"),
    ("cap619", "ram.img", "memfd-v1"), ("cap619", "ram.elf", "memfd-v1"),
])
def test_the_captured_memfd_comes_back_byte_for_byte(cap: str, ram: str, compatible: str,
                                                     tmp_path: Path,
                                                     request: pytest.FixtureRequest) -> None:
    src: Path = request.getfixturevalue(cap)
    out = tmp_path / "x"
    rc, rep, err = inspect("--ram", str(src / ram), "--extract", str(out))  # scanned root
    assert rc == 0, err
    (entry,) = _manifest(out)
    assert entry["session"] == generations.SESSION and entry["token"] == hex(generations.TOKEN)
    assert entry["compatible"] == compatible and entry["size"] == len(generations.PAYLOAD)
    assert entry["sha256"] == hashlib.sha256(generations.PAYLOAD).hexdigest()
    path = out / generations.SESSION / f"{generations.TOKEN:016x}.bin"
    assert entry["path"] == f"{generations.SESSION}/{generations.TOKEN:016x}.bin"
    assert path.read_bytes() == generations.PAYLOAD
    assert rep["extract"]["files"] == [{"path": entry["path"], "size": entry["size"],
                                        "sha256": entry["sha256"]}]
    # the same through setup_data
    rc, _, err = inspect("--ram", str(src / ram), str(src / "setup_data.bin"), "--extract",
                         str(tmp_path / "y"))
    assert rc == 0, err
    assert (tmp_path / "y" / entry["path"]).read_bytes() == generations.PAYLOAD


@pytest.mark.parametrize("generation, session", [("6.19", "vm1"), ("v3", extract.V3_DIR)])
def test_large_folios_are_written_sparse(generation: str, session: str,
                                         tmp_path: Path) -> None:
    """luoctl example: 2 MiB folios whose first bytes are stamped, the rest zero."""
    ex = write_example(tmp_path / "ex", generation)
    out = tmp_path / "x"
    rc, _, err = inspect("--ram", str(ex / "ram.img"), "--extract", str(out))
    assert rc == 0, err
    (entry,) = _manifest(out)
    path = out / session / "0000000000000001.bin"
    data = path.read_bytes()
    assert len(data) == entry["size"] == (8 * 512 + 1) * 4096  # 16 MiB of folios + a tail
    for i in range(8):
        stamp = f"guest page {i * 512}".encode()
        assert data[i * (2 << 20) : i * (2 << 20) + len(stamp)] == stamp
    assert data[-4096:].startswith(b"tail")
    assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    # only the stamped pages hold blocks: a hole everywhere else
    assert entry["data_pages"] == 9 and os.stat(path).st_blocks * 512 < 1 << 20


# -- hostile handovers: each refused, nothing written ---------------------------------------

def _fresh(cap72: Path, tmp: Path) -> tuple[Path, PhysMem, luo_ser.LuoSer]:
    """A private copy of the session's 7.2 capture (sparse), mapped: tests damage it."""
    for name in ("ram.img", "setup_data.bin"):
        subprocess.run(["cp", "--sparse=always", str(cap72 / name), str(tmp / name)],
                       check=True)
    with open(tmp / "ram.img", "rb") as f:
        mem = PhysMem(mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ))
    kd = bootparams.KhoData.decode((tmp / "setup_data.bin").read_bytes()[16:])
    root = kho.decode_root(mem.read_fdt(kd.fdt_addr, "root"))
    return tmp / "ram.img", mem, luo_ser.decode(mem.read(root.subtree("LUO"), 32))


def _put(ram: Path, phys: int, data: bytes) -> None:
    with open(ram, "r+b") as f:
        f.seek(phys)
        f.write(data)


def _folio_array(mem: PhysMem, ser: luo_ser.LuoSer) -> int:
    (session,), _ = luo_ser.decode_sessions(mem, ser.sessions_pa)
    m = memfd.decode_ser(mem.read(session.files[0].data, memfd.SER_V2_SIZE), memfd.MEMFD_V2)
    return int(vmalloc.decode(mem, m.folios).block_phys[0])


def _refused(ram: Path, out: Path, message: str) -> None:
    rc, rep, err = inspect("--ram", str(ram), "--extract", str(out))
    assert rc == 1 and message in rep["extract"]["error"], rep.get("extract")
    assert rep["extract"]["error"].startswith("nothing written: ")
    assert not out.exists() and "Traceback" not in err


@pytest.mark.parametrize("name", [b"..", b"."])
def test_a_session_name_that_would_escape_is_refused(cap72: Path, tmp_path: Path,
                                                    name: bytes) -> None:
    ram, _, ser = _fresh(cap72, tmp_path)
    _put(ram, ser.sessions_pa + 16, name.ljust(64, b"\0"))
    _refused(ram, tmp_path / "out", "cannot be a directory")


def test_session_names_are_made_safe_not_dangerous(cap72: Path, tmp_path: Path) -> None:
    ram, _, ser = _fresh(cap72, tmp_path)
    _put(ram, ser.sessions_pa + 16, b"../etc/%x\x01".ljust(64, b"\0"))
    out = tmp_path / "out"
    rc, _, err = inspect("--ram", str(ram), "--extract", str(out))
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["..%2Fetc%2F%25x%01", "manifest.json"]
    assert _manifest(out)[0]["session"] == "../etc/%x\x01"


def test_a_folio_that_is_not_preserved_is_refused(cap72: Path, tmp_path: Path) -> None:
    ram, mem, ser = _fresh(cap72, tmp_path)
    arr = _folio_array(mem, ser)
    desc = int.from_bytes(mem.read(arr, 8), "little")
    _put(ram, arr, struct.pack("<Q", (desc & ~memfd.PFN_MASK) | (0x3000_0000 >> 12)))
    _refused(ram, tmp_path / "out", "folio at 0x30000000 is not a preserved block")


def test_a_folio_beyond_the_file_size_is_refused(cap72: Path, tmp_path: Path) -> None:
    ram, mem, ser = _fresh(cap72, tmp_path)
    _put(ram, _folio_array(mem, ser) + 8, struct.pack("<Q", 16))  # index 16 of a 16-page file
    _refused(ram, tmp_path / "out", "beyond the file size")


def test_a_misaligned_large_folio_is_refused(cap72: Path, tmp_path: Path) -> None:
    ram, mem, ser = _fresh(cap72, tmp_path)
    # the 64 KiB payload is one order-4 folio: put it at file page 1 of a larger file
    (session,), _ = luo_ser.decode_sessions(mem, ser.sessions_pa)
    _put(ram, session.files[0].data + 8, struct.pack("<Q", 1 << 20))  # size: 1 MiB
    _put(ram, _folio_array(mem, ser) + 8, struct.pack("<Q", 1))
    _refused(ram, tmp_path / "out", "has file index 1, not aligned to its order")


def test_a_size_larger_than_ram_is_refused(cap72: Path, tmp_path: Path) -> None:
    ram, mem, ser = _fresh(cap72, tmp_path)
    (session,), _ = luo_ser.decode_sessions(mem, ser.sessions_pa)
    _put(ram, session.files[0].data + 8, struct.pack("<Q", 1 << 40))
    _refused(ram, tmp_path / "out", "exceeds all of RAM")


def test_two_files_sharing_a_folio_are_refused(cap72: Path, tmp_path: Path) -> None:
    """The plan checks physical overlap across files; a second session is forged by hand."""
    _, mem, _ = _fresh(cap72, tmp_path)
    kd = bootparams.KhoData.decode((tmp_path / "setup_data.bin").read_bytes()[16:])
    planned = extract.plan(mem, mem.read_fdt(kd.fdt_addr, "root"))
    twice = [planned[0], extract.Planned(planned[0].file, "other/x.bin", planned[0].phys,
                                         planned[0].order, planned[0].index)]
    with pytest.raises(Exception, match="overlaps another preserved folio"):
        extract._check_shared(twice)
    assert np.array_equal(planned[0].index, [0])


def test_a_symlink_in_the_extract_directory_is_not_followed(cap72: Path,
                                                            tmp_path: Path) -> None:
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / generations.SESSION).symlink_to(elsewhere)
    rc, rep, _ = inspect("--ram", str(cap72 / "ram.img"), "--extract", str(out))
    assert rc == 1 and "is a symbolic link" in rep["extract"]["error"]
    assert list(elsewhere.iterdir()) == [] and not (out / "manifest.json").exists()
