"""RAM files: raw images and QEMU dump-guest-memory ELF cores, the latter hostile input."""

from __future__ import annotations

import errno
import mmap
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from liveupdate.abi import bootparams
from liveupdate.errors import AbiError, LiveUpdateError
from liveupdate.tools import ramfile
from tests.tools.cli import LUOCTL, inspect
from tests.tools.elfcore import BIOS, EHDR, PHDR, SHDR, ehdr, pc_segments, write_core


@pytest.fixture
def raw(cap72: Path) -> Iterator[mmap.mmap]:
    """The 7.2 capture's 1 GiB sparse image, mapped rather than read; unmapped after."""
    with open(cap72 / "ram.img", "rb") as f, \
            mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        yield m


def test_elf_core_maps_every_pt_load_to_its_physical_range(cap72: Path,
                                                           raw: mmap.mmap) -> None:
    """The layout of a real QEMU dump: all low RAM in one PT_LOAD, the BIOS ROM in another."""
    with ramfile.open_ram(cap72 / "ram.elf") as (mem, info):
        assert info.format == "elf-core"
        assert mem.ranges == [(0, len(raw)), BIOS]
        assert mem.read(BIOS[0], 8) == b"BIOSBIOS"
        for phys in (0x0, 0x9F000, 0x1FE000, len(raw) - 4096):
            assert mem.read(phys, 4096) == raw[phys : phys + 4096]
        with pytest.raises(AbiError, match="outside RAM"):
            mem.read(len(raw), 4)


def test_elf_core_split_around_the_legacy_hole(cap72: Path, tmp_path: Path,
                                               raw: mmap.mmap) -> None:
    core = tmp_path / "split.elf"
    loads = write_core(cap72 / "ram.img", core, pc_segments(len(raw)))
    with ramfile.open_ram(core) as (mem, info):
        assert [(p, n) for p, n, _ in info.segments] == [(p, n) for p, n, _ in loads]
        # the legacy hole is not RAM; the pieces above it touch and form one range
        assert mem.ranges == [(0, 0xA0000), (0xC0000, len(raw) - 0xC0000)]
        for phys in (0x9F000, 0xC0000, 0xDF000, 0xFF000, 0x1FE000):
            assert mem.read(phys, 4096) == raw[phys : phys + 4096]
        assert mem.read(0xDFFF8, 16) == raw[0xDFFF8:0xE0008]  # across two PT_LOADs
        with pytest.raises(AbiError, match="outside RAM"):
            mem.read(0xA0000, 4)
    rc, rep, err = inspect("--ram", str(core))
    assert rc == 0, err
    root = bootparams.KhoData.decode((cap72 / "setup_data.bin").read_bytes()[16:]).fdt_addr
    assert rep["chosen"] == f"{root:#x}" and len(rep["ram"]["pt_load"]) == 4


def test_inspect_reads_an_elf_core_as_it_reads_the_raw_image(cap72: Path) -> None:
    rc, raw, err = inspect("--ram", str(cap72 / "ram.img"), str(cap72 / "setup_data.bin"))
    assert rc == 0, err
    rc, core, err = inspect("--ram", str(cap72 / "ram.elf"), str(cap72 / "setup_data.bin"))
    assert rc == 0, err
    assert core.pop("ram")["format"] == "elf-core" and raw.pop("ram")["format"] == "raw"
    assert core == raw
    assert core["root"]["memory"]["pages"] > 2048


def _core(phdrs: list[tuple[int, ...]], size: int = 0x3000, **kw: Any) -> bytes:
    head = ehdr(len(phdrs), **kw) + b"".join(PHDR.pack(*p) for p in phdrs)
    return head.ljust(size, b"\0")


LOAD = (1, 0, 0x1000, 0, 0x0, 0x1000, 0x1000, 0)


@pytest.mark.parametrize("blob, err, message", [
    (b"\x7fELF" + bytes(20), errno.ENOEXEC, "shorter than the 64-byte ELF header"),
    (_core([LOAD], ident=b"\x7fELF\x01\x01\x01" + bytes(9)), errno.ENOEXEC, "only ELF64"),
    (_core([LOAD], ident=b"\x7fELF\x02\x02\x01" + bytes(9)), errno.ENOEXEC, "little-endian"),
    (_core([LOAD], e_type=2), errno.ENOEXEC, "not ET_CORE"),
    (_core([LOAD], machine=183), errno.ENOEXEC, "e_machine 183"),
    (_core([LOAD], size=0x90), errno.EINVAL, "run past the"),
    (_core([(1, 0, 0x2800, 0, 0, 0x1000, 0x1000, 0)]), errno.EINVAL, "PT_LOAD 0: 0x1000 bytes"),
    (_core([(1, 0, 0x1000, 0, 0, 0x1000, 0x800, 0)]), errno.EINVAL, "p_filesz 0x1000 > p_memsz"),
    (_core([(1, 0, 0x1000, 0, (1 << 64) - 0x800, 0x1000, 0x1000, 0)]), errno.EINVAL,
     "wraps past 2^64"),
    (_core([LOAD, (1, 0, 0x2000, 0, 0x800, 0x1000, 0x1000, 0)]), errno.EINVAL,
     "PT_LOAD 0 (0x0+0x1000) and PT_LOAD 1 (0x800) overlap"),
    (_core([(4, 0, 0x1000, 0, 0, 0x10, 0x10, 0)]), errno.EINVAL, "no PT_LOAD"),
    (_core([LOAD])[:32] + (8).to_bytes(8, "little") + _core([LOAD])[40:], errno.EINVAL,
     "program headers at 0x8 overlap the ELF header"),
])
def test_hostile_elf_headers_are_refused_with_their_reason(tmp_path: Path, blob: bytes,
                                                           err: int, message: str) -> None:
    with pytest.raises(AbiError) as e:
        ramfile.parse_elf_core(blob, len(blob))
    assert e.value.errno == err and message in e.value.message
    f = tmp_path / "core"
    f.write_bytes(blob)
    p = subprocess.run([*LUOCTL, "inspect", "--ram", str(f)], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and message in p.stderr
    assert "Traceback" not in p.stderr


def _numbered(n: int, phnum: int | None = None) -> bytes:
    """A core of ``n`` 16-byte PT_LOADs; ``phnum`` None: the count in section header 0's
    sh_info under e_phnum = PN_XNUM (the gABI extended numbering)."""
    phoff = EHDR.size
    shoff = phoff + PHDR.size * n
    data = shoff + SHDR.size
    head = ehdr(0xFFFF if phnum is None else phnum, shoff=shoff, shnum=1)
    body = b"".join(PHDR.pack(1, 0, data + 16 * i, 0, 0x1000 * i, 16, 16, 0) for i in range(n))
    return head + body + SHDR.pack(0, 0, 0, 0, 0, 0, 0, n, 0, 0) + bytes(16 * n)


def test_extended_numbering_reads_the_count_from_section_header_0() -> None:
    n = 100
    blob = _numbered(n)
    segs, notes = ramfile.parse_elf_core(blob, len(blob))
    data = EHDR.size + PHDR.size * n + SHDR.size
    assert len(segs) == n and segs[-1] == (0x1000 * (n - 1), 16, data + 16 * (n - 1))
    assert notes == []
    bad = blob[:40] + (len(blob) + 8).to_bytes(8, "little") + blob[48:]
    with pytest.raises(AbiError, match="PN_XNUM but section header 0"):
        ramfile.parse_elf_core(bad, len(bad))


@pytest.mark.parametrize("phnum", [None, ramfile.MAX_PHDRS + 1])
def test_more_program_headers_than_any_guest_has_are_refused(phnum: int | None) -> None:
    """Each PT_LOAD is a RAM range every read is checked against: QEMU writes a few dozen,
    and the bound keeps a hostile core from making every read slow."""
    assert ramfile.MAX_PHDRS <= 4096
    blob = _numbered(70000 if phnum is None else phnum, phnum)
    with pytest.raises(AbiError) as e:
        ramfile.parse_elf_core(blob, len(blob))
    assert e.value.errno == errno.EINVAL and f"(1..{ramfile.MAX_PHDRS})" in e.value.message
    blob = _numbered(ramfile.MAX_PHDRS, ramfile.MAX_PHDRS)
    assert len(ramfile.parse_elf_core(blob, len(blob))[0]) == ramfile.MAX_PHDRS


def test_memsz_beyond_the_file_is_noted_not_ram(tmp_path: Path) -> None:
    blob = _core([(1, 0, 0x1000, 0, 0x0, 0x1000, 0x3000, 0)])
    segs, notes = ramfile.parse_elf_core(blob, len(blob))
    assert segs == [(0, 0x1000, 0x1000)]
    assert notes == ["0x2000 bytes of p_memsz are not in the file (not treated as RAM)"]


def test_sparse_raw_image_reports_its_data_extents(cap72: Path, tmp_path: Path) -> None:
    with ramfile.open_ram(cap72 / "ram.img") as (mem, info):
        assert info.format == "raw" and mem.ranges == [(0, info.size)]
        ext = info.data_extents
        assert ext is not None and 0 < sum(e - s for s, e in ext) < info.size // 16
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(LiveUpdateError, match="empty RAM file"), ramfile.open_ram(empty):
        pass
