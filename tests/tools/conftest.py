"""Handovers written by the emulated kernels (luoctl capture) and by the codecs (luoctl
example), once per test session, plus QEMU-style ELF cores of them."""

from __future__ import annotations

from pathlib import Path

import pytest

from liveupdate.tools import capture, example
from tests.tools.elfcore import write_core


@pytest.fixture(scope="session")
def cap72(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """7.2 at the jump: kho-v4, luo-v5, one memfd-v2 of tools.generations.PAYLOAD."""
    out = tmp_path_factory.mktemp("cap72")
    capture.capture("7.2", "7.2", out)
    write_core(out / "ram.img", out / "ram.elf")
    return out


@pytest.fixture(scope="session")
def cap619(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6.19 at the jump: kho-v1 bitmaps, luo-v1 FDT, one memfd-v1."""
    out = tmp_path_factory.mktemp("cap619")
    capture.capture("6.19", "6.19", out)
    write_core(out / "ram.img", out / "ram.elf")
    return out


def write_example(out: Path, generation: str) -> Path:
    """luoctl example's bytes, written as the command does (sparse ram.img)."""
    import os

    ex = example.build(generation, 1 << 30, 16)
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / "ram.img", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, ex.ram_size)
        for phys, data in sorted(ex.writes.items()):
            os.pwrite(fd, data, phys)
    finally:
        os.close(fd)
    (out / "setup_data.bin").write_bytes(ex.setup_data)
    return out
