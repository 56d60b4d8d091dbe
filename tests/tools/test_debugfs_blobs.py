"""/sys/kernel/debug/kho/ blobs as Linux 7.3 exports them (kexec_handover_debugfs.c): a
truncated out/fdt, raw luo_ser and kexec-metadata, out/ LUO before reboot, stale in/ LUO."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from liveupdate.abi import bootparams, kexec_metadata, kho, luo_ser
from liveupdate.tools import report_debugfs
from tests.tools.cli import inspect


def _put(tmp: Path, rel: str, data: bytes) -> Path:
    f = tmp / rel
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(data)
    return f


def _sizes_at_fs_initcall(compat: str, mem_map: int, meta: tuple[int, int]) -> int:
    """out/fdt's size: the root as kho_init leaves it, with kexec-metadata only."""
    r = kho.LiveRoot(compat, mem_map)
    r.add_subtree(kexec_metadata.NODE, *meta)
    return len(r.blob)


def test_7_3_out_fdt_cut_in_the_strings_block_is_read_whole(tmp_path: Path) -> None:
    """7.3 order: kexec-metadata at fs_initcall, LUO at late_initcall. 233 of 285 bytes:
    every node is there, all but five bytes of property names are gone."""
    r = kho.LiveRoot(kho.KHO_V4, 0x1FF000)
    r.add_subtree("kexec-metadata", 0x1F8000, 73)
    size = len(r.blob)
    r.add_subtree("LUO", 0x1F6000, 32)
    assert (size, len(r.blob)) == (233, 285)
    f = _put(tmp_path, "debugfs/out/fdt", r.blob[:size])
    rc, rep, err = inspect(str(f))
    assert rc == 0, err
    assert rep["kind"] == "truncated-fdt" and rep["missing_bytes"] == 52
    assert rep["unreadable"] == ["strings block: 52 of 57 bytes cut"]
    assert "/LUO:preserved-data" in rep["names_inferred"] and rep["read"] == []
    root = rep["root"]
    assert root["compatible"] == "kho-v4" and root["preserved_memory_map"] == "0x1ff000"
    assert [(s["name"], s["preserved_data"], s["blob_size"]) for s in root["subtrees"]] == [
        ("LUO", "0x1f6000", 32), ("kexec-metadata", "0x1f8000", 73)]
    assert "fs_initcall" in rep["why"]


def _pread(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        return os.pread(f.fileno(), size, offset)


def test_out_fdt_cut_inside_the_structure_block_keeps_whole_nodes(cap72: Path,
                                                                   tmp_path: Path) -> None:
    kd = bootparams.KhoData.decode((cap72 / "setup_data.bin").read_bytes()[16:])
    page = _pread(cap72 / "ram.img", kd.fdt_addr, 4096)
    full = page[: int.from_bytes(page[4:8], "big")]
    root = kho.decode_root(full)
    meta = (root.subtree(kexec_metadata.NODE), root.size(kexec_metadata.NODE) or 0)
    size = _sizes_at_fs_initcall(root.compatible, root.mem_map, meta)
    f = _put(tmp_path, "out/fdt", full[:size])
    rc, rep, err = inspect("--ram", str(cap72 / "ram.img"), str(f))
    assert rc == 0, err
    names = [s["name"] for s in rep["root"]["subtrees"]]
    whole = [n for n, _ in root.subtrees]
    assert names == whole[: len(names)] and 0 < len(names) < len(whole)
    lost = whole[len(names)]  # its name is cut short: the file ends inside it
    cut = next(u for u in rep["unreadable"] if u.endswith("...: cut inside its name"))
    assert lost.startswith(cut.removeprefix("node /").split("...")[0])
    assert any("structure block" in u for u in rep["unreadable"])
    luo = next(s for s in rep["root"]["subtrees"] if s["name"] == "LUO")["content"]
    assert luo["kind"] == "luo-v5" and luo["sessions"]["list"][0]["name"] == "matrix"
    # --extract works from it too: the rebuilt root leads to the memfd
    rc, rep, err = inspect("--ram", str(cap72 / "ram.img"), str(f),
                           "--extract", str(tmp_path / "x"))
    assert rc == 0, err
    assert rep["extract"]["files"][0]["path"].startswith("matrix/")


def test_out_luo_before_reboot_says_not_yet_serialized(tmp_path: Path) -> None:
    f = _put(tmp_path, "out/sub_fdts/LUO", luo_ser.encode(luo_ser.LuoSer(1, 0, 0x1F7000)))
    rc, rep, err = inspect(str(f))
    assert rc == 0, err
    assert rep["kind"] == "luo-v5" and rep["sessions_note"] == report_debugfs.NOT_SERIALIZED
    elsewhere = _put(tmp_path, "luo.bin", f.read_bytes())
    rc, rep, _ = inspect(str(elsewhere))
    assert rc == 0 and "no sessions were handed over" in rep["sessions_note"]


def test_kexec_metadata_blob_is_known_by_content(tmp_path: Path) -> None:
    blob = kexec_metadata.encode(kexec_metadata.KexecMetadata("7.3.4-amd64", 2))
    assert len(blob) == 73
    rc, rep, err = inspect(str(_put(tmp_path, "out/sub_fdts/kexec-metadata", blob)))
    assert rc == 0, err
    assert (rep["kind"], rep["previous_release"], rep["kexec_count"]) == (
        "kexec-metadata", "7.3.4-amd64", 2)


def test_stale_in_luo_that_does_not_decode_is_explained(tmp_path: Path) -> None:
    f = _put(tmp_path, "debugfs-after/in/sub_fdts/LUO", bytes(32))
    rc, rep, err = inspect(str(f))
    assert rc == 1 and rep["kind"] == "unknown" and "not a KHO root FDT" in rep["error"]
    assert rep["note"] == report_debugfs.STALE_IN and "Traceback" not in err
    # the same bytes anywhere else are only refused
    rc, rep, err = inspect(str(_put(tmp_path, "LUO", bytes(32))))
    assert rc == 1 and rep == {} and err.count("\n") == 1


def test_stale_in_luo_with_garbage_pointers_is_explained(tmp_path: Path) -> None:
    blob = luo_ser.encode(luo_ser.LuoSer(1, 0xDEAD_BEEF_0123, 0x1F7008))
    rc, rep, _ = inspect(str(_put(tmp_path, "in/sub_fdts/LUO", blob)))
    assert rc == 1 and "not page aligned" in rep["error"] and rep["note"] == \
        report_debugfs.STALE_IN


def test_stale_in_luo_pointing_at_reused_pages_is_explained(cap72: Path,
                                                             tmp_path: Path) -> None:
    """A luo_ser still intact, but the session blocks it names were freed and reused."""
    rc, good, _ = inspect("--ram", str(cap72 / "ram.img"), str(cap72 / "setup_data.bin"))
    luo = next(s for s in good["root"]["subtrees"] if s["name"] == "LUO")
    phys = int(luo["preserved_data"], 16)
    blob = _pread(cap72 / "ram.img", phys, 32)
    ser = luo_ser.decode(blob)
    ram = tmp_path / "ram.img"
    subprocess.run(["cp", "--sparse=always", str(cap72 / "ram.img"), str(ram)], check=True)
    with open(ram, "r+b") as f:
        f.seek(ser.sessions_pa)
        f.write(bytes(range(256)) * 16)  # the block now holds someone else's data
    rc, rep, _ = inspect("--ram", str(ram), str(_put(tmp_path, "in/sub_fdts/LUO", blob)))
    assert rc == 1 and "error" in rep["sessions"] and rep["note"] == report_debugfs.STALE_IN
    rc, rep, err = inspect("--ram", str(cap72 / "ram.img"),
                           str(_put(tmp_path, "x/in/sub_fdts/LUO", blob)))
    assert rc == 0, err
    assert rep["note"] == report_debugfs.STALE_IN_INTACT
