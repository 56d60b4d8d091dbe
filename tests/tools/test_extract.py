"""luoctl inspect --extract: preserved memfds written out, sparse, with a manifest; hostile
handovers refused before anything is written."""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import resource
import struct
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from liveupdate.abi import bootparams, kho, luo_ser, memfd, vmalloc
from liveupdate.abi.physmem import PhysMem
from liveupdate.errors import AbiError
from liveupdate.scenario import generations
from liveupdate.tools import extract, extract_write, ramfile
from tests.tools.cli import LUOCTL, inspect
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
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".partial")]


@pytest.mark.parametrize("name", [b"..", b"."])
def test_a_session_name_that_would_escape_is_refused(cap72: Path, tmp_path: Path,
                                                    name: bytes) -> None:
    ram, _, ser = _fresh(cap72, tmp_path)
    _put(ram, ser.sessions_pa + 16, name.ljust(64, b"\0"))
    _refused(ram, tmp_path / "out", "cannot be a directory")


@pytest.mark.parametrize(("name", "folder"), [
    (b"../etc/%x\x01", "..%2Fetc%2F%25x%01"),  # made safe, not dangerous
    (b"manifest.json", "manifest%2Ejson"),    # the manifest keeps its name beside it
])
def test_session_names_become_safe_folder_names(cap72: Path, tmp_path: Path, name: bytes,
                                                folder: str) -> None:
    ram, _, ser = _fresh(cap72, tmp_path)
    _put(ram, ser.sessions_pa + 16, name.ljust(64, b"\0"))
    out = tmp_path / "out"
    rc, _, err = inspect("--ram", str(ram), "--extract", str(out))
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted([folder, "manifest.json"])
    assert _manifest(out)[0]["session"] == name.decode()


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
    planned = extract.plan(mem, mem.read_fdt(kd.fdt_addr, "root")).files
    twice = [planned[0], extract.Planned(planned[0].file, "other/x.bin", planned[0].phys,
                                         planned[0].order, planned[0].index)]
    with pytest.raises(AbiError, match="overlaps another preserved folio"):
        extract._check_shared(twice)
    assert np.array_equal(planned[0].index, [0])


def test_two_files_at_one_path_are_refused(cap72: Path, tmp_path: Path) -> None:
    """A session name and token given twice: the second file would replace the first."""
    _, mem, _ = _fresh(cap72, tmp_path)
    kd = bootparams.KhoData.decode((tmp_path / "setup_data.bin").read_bytes()[16:])
    (one,) = extract.plan(mem, mem.read_fdt(kd.fdt_addr, "root")).files
    with pytest.raises(AbiError) as e:
        extract._check_paths([one, one])
    assert e.value.errno == errno.EEXIST and f"both be written to {one.relpath}" in str(e.value)


@pytest.mark.parametrize("planted", [generations.SESSION, "manifest.json"])
def test_a_symlink_in_the_extract_directory_is_not_followed(cap72: Path, tmp_path: Path,
                                                            planted: str) -> None:
    """DIR must be new or empty: a link planted in it -- to the session's directory, or
    where the manifest goes (written with write_text, it followed the link) -- is never
    written through."""
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    target = elsewhere if planted == generations.SESSION else elsewhere / "victim"
    if planted != generations.SESSION:
        target.write_text("keep me")
    (out / planted).symlink_to(target)
    rc, rep, _ = inspect("--ram", str(cap72 / "ram.img"), "--extract", str(out))
    assert rc == 1 and "is not empty" in rep["extract"]["error"]
    assert rep["extract"]["errno"] == "ENOTEMPTY" and "root" in rep
    assert sorted(p.name for p in elsewhere.iterdir()) == ([] if target == elsewhere
                                                           else ["victim"])
    assert planted == generations.SESSION or target.read_text() == "keep me"
    assert [p.name for p in out.iterdir()] == [planted]


def test_files_of_an_earlier_extract_make_dir_refused(cap72: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    rc, _, err = inspect("--ram", str(cap72 / "ram.img"), "--extract", str(out))
    assert rc == 0, err
    (out / "old-session").mkdir()  # what an earlier extract of another handover left
    before = sorted(p.name for p in out.rglob("*"))
    rc, rep, _ = inspect("--ram", str(cap72 / "ram.img"), "--extract", str(out))
    assert rc == 1 and rep["extract"]["errno"] == "ENOTEMPTY"
    assert sorted(p.name for p in out.rglob("*")) == before


@pytest.mark.parametrize("form", ["empty dir", "link to an empty dir", "parent is a file"])
def test_dir_is_new_or_an_empty_directory(cap72: Path, tmp_path: Path, form: str) -> None:
    out = tmp_path / "out"
    if form == "empty dir":
        out.mkdir()
    elif form == "link to an empty dir":
        (tmp_path / "real").mkdir()
        out.symlink_to(tmp_path / "real")
    else:
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "out"
    rc, rep, err = inspect("--ram", str(cap72 / "ram.img"), "--extract", str(out))
    if form == "empty dir":
        assert rc == 0, err
        assert _manifest(out)[0]["sha256"] == hashlib.sha256(generations.PAYLOAD).hexdigest()
        assert out.stat().st_mode & 0o777 == 0o777 & ~_umask()
    else:
        want = "is a symbolic link" if form.startswith("link") else "not a directory"
        assert rc == 1 and want in rep["extract"]["error"] and "root" in rep, rep
        assert rep["extract"]["errno"] == ("EEXIST" if form.startswith("link") else "ENOTDIR")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_a_write_that_fails_partway_leaves_nothing_and_keeps_the_report(
        cap72: Path, tmp_path: Path) -> None:
    """RLIMIT_FSIZE makes the 64 KiB memfd's ftruncate fail with EFBIG, as a full disk would
    with ENOSPC: the report is still printed, the extract entry names the errno, and
    neither DIR nor the temporary directory is left."""
    out = tmp_path / "out"

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 10, 16 << 10))

    p = subprocess.run([*LUOCTL, "inspect", "--json", "--ram", str(cap72 / "ram.img"),
                        "--extract", str(out)], capture_output=True, text=True, timeout=300,
                       preexec_fn=small_files)
    rep = json.loads(p.stdout)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert rep["extract"]["errno"] == "EFBIG" and rep["root"]["kind"] == "kho-root"
    assert rep["extract"]["error"].startswith(f"nothing written: {out}/")
    assert list(tmp_path.iterdir()) == []


def test_files_that_are_not_memfds_are_listed_as_skipped(cap72: Path, tmp_path: Path) -> None:
    ram, mem, ser = _fresh(cap72, tmp_path)
    files_block = int.from_bytes(mem.read(ser.sessions_pa + 16 + 64, 8), "little")
    _put(ram, files_block + 16, b"vfio-pci-v1".ljust(48, b"\0"))  # the file's compatible
    out = tmp_path / "out"
    rc, rep, err = inspect("--ram", str(ram), "--extract", str(out))
    assert rc == 0, err
    skipped = [{"session": generations.SESSION, "token": hex(generations.TOKEN),
                "compatible": "vfio-pci-v1",
                "why": "not a memfd (vfio-pci-v1): only memfd contents are in the "
                       "handover's memory to extract"}]
    assert rep["extract"]["skipped"] == skipped and rep["extract"]["files"] == []
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == {"files": [], "skipped": skipped}


def test_a_root_without_luo_says_there_is_nothing_to_extract(tmp_path: Path) -> None:
    ram = bytearray(8 * 4096)
    root = kho.LiveRoot(kho.KHO_FDT_COMPATIBLE, 0)
    ram[0x2000 : 0x2000 + len(root.blob)] = root.blob
    (tmp_path / "ram").write_bytes(ram)
    out = tmp_path / "out"
    rc, rep, err = inspect("--ram", str(tmp_path / "ram"), "--extract", str(out))
    assert rc == 0, err  # not an error in the handover: said, not failed
    assert rep["extract"]["note"] == "no LUO subtree: nothing to extract"
    assert json.loads((out / "manifest.json").read_text()) == {
        "files": [], "skipped": [], "note": "no LUO subtree: nothing to extract"}


def test_folios_are_copied_in_bounded_chunks(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A folio may be as large as RAM: it is read COPY_CHUNK bytes at a time (1 MiB here,
    against the example's 2 MiB folios), with the same result."""
    ex = write_example(tmp_path / "ex", "6.19")
    monkeypatch.setattr(extract_write, "COPY_CHUNK", 1 << 20)
    reads: list[int] = []

    def spy(phys: int, size: int, what: str) -> None:
        if what == "memfd folio":
            reads.append(size)

    kd = bootparams.KhoData.decode((ex / "setup_data.bin").read_bytes()[16:])
    with ramfile.open_ram(ex / "ram.img") as (mem, _):
        got = extract.extract(mem.counted(spy), mem.read_fdt(kd.fdt_addr, "root"),
                              tmp_path / "x")
    assert reads and max(reads) == 1 << 20 and len(reads) == 8 * 2 + 1
    data = (tmp_path / "x" / "vm1" / "0000000000000001.bin").read_bytes()
    assert got["files"][0]["sha256"] == hashlib.sha256(data).hexdigest()
    for i in range(8):
        stamp = f"guest page {i * 512}".encode()
        assert data[i * (2 << 20) : i * (2 << 20) + len(stamp)] == stamp
