"""The new inputs of luoctl inspect are hostile input: mutated and cut debugfs blobs, ELF
headers and RAM pages give a report or a LiveUpdateError, never another exception."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from liveupdate.abi import kho
from liveupdate.abi.physmem import PhysMem
from liveupdate.errors import LiveUpdateError
from liveupdate.tools import ramfile, report_debugfs, report_ram
from tests.tools.elfcore import PHDR, SHDR, ehdr


def _out_fdt() -> bytes:
    """A 7.3 out/fdt: the root cut at its fs_initcall size."""
    r = kho.LiveRoot(kho.KHO_V4, 0x53B000)
    r.add_subtree("kexec-metadata", 0x550000, 73)
    size = len(r.blob)
    r.add_subtree("kho_test", 0x6C8000, 240)
    r.add_subtree("LUO", 0x24B4000, 32)
    return r.blob[:size]


OUT_FDT = _out_fdt()
HEAD = (ehdr(3, phoff=192, shoff=64, shnum=2) + SHDR.pack(*[0] * 10)
        + SHDR.pack(1, 3, 0, 0, 0x2000, 11, 0, 0, 0, 0)
        + PHDR.pack(4, 0, 0x168, 0, 0, 0x20, 0x20, 0)
        + PHDR.pack(1, 0, 0x1000, 0, 0, 0x1000, 0x1000, 0)
        + PHDR.pack(1, 0, 0x2000, 0xFFFC0000, 0xFFFC0000, 0x100, 0x100, 0)).ljust(0x2100, b"\0")


def _mutate(base: bytes, data: st.DataObject) -> bytes:
    blob = bytearray(base)
    for _ in range(data.draw(st.integers(0, 6))):
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] = data.draw(st.integers(0, 255))
    return bytes(blob[: data.draw(st.integers(0, len(blob)))])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.sampled_from(["out/fdt", "in/sub_fdts/LUO", "out/sub_fdts/LUO", "x"]))
def test_debugfs_blobs(data: st.DataObject, name: str) -> None:
    blob = _mutate(OUT_FDT if name.endswith("fdt") else OUT_FDT[:73], data)
    mem = PhysMem(bytearray(1 << 16), base=0x530000)
    try:
        rep = report_debugfs.describe_file(Path("/d") / name, blob, mem, None)
    except LiveUpdateError:
        return
    assert isinstance(rep, dict)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_elf_headers(data: st.DataObject) -> None:
    blob = _mutate(HEAD, data)
    try:
        segs, _ = ramfile.parse_elf_core(blob, len(blob))
        PhysMem.from_segments(blob, segs)
    except LiveUpdateError:
        return


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_ram_scan(data: st.DataObject) -> None:
    """Pages starting with the FDT magic and random bytes, or mutated KHO roots."""
    ram = bytearray(16 * 4096)
    root = kho.LiveRoot(kho.KHO_V4, 0x3000)
    root.add_subtree("LUO", 0x4000, 32)
    for page in data.draw(st.lists(st.integers(0, 15), max_size=4)):
        blob = _mutate(root.blob, data) if data.draw(st.booleans()) else \
            b"\xd0\x0d\xfe\xed" + data.draw(st.binary(max_size=200))
        ram[page * 4096 : page * 4096 + len(blob)] = blob
    rep, _ = report_ram.describe_ram(PhysMem(ram), None)
    assert rep["kind"] == "ram-scan"


def test_a_subtree_pointing_back_at_its_root_is_an_error_not_a_recursion() -> None:
    """Found by test_ram_scan: kho-v4 root at 0x4000 whose LUO subtree is 0x4000 itself."""
    ram = bytearray(16 * 4096)
    root = kho.LiveRoot(kho.KHO_V4, 0x3000)
    root.add_subtree("LUO", 0x4000, 32)
    ram[0x4000 : 0x4000 + len(root.blob)] = root.blob
    rep, _ = report_ram.describe_ram(PhysMem(ram), None)
    error = rep["root"]["subtrees"][0]["content"]["error"]
    assert "subtree LUO at 0x4000 points back at the KHO root" in error and "ELOOP" in error
