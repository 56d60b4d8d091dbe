"""Handovers written by the emulated kernels (luoctl capture) and by the codecs (luoctl
example), once per test session, plus QEMU-style ELF cores of them."""

from __future__ import annotations

from pathlib import Path

import pytest

from liveupdate.scenario import capture
from liveupdate.tools import example
from tests.tools.elfcore import write_core


def _captured(tmp_path_factory: pytest.TempPathFactory, generation: str) -> Path:
    out = tmp_path_factory.mktemp(f"cap{generation.replace('.', '')}")
    capture.capture(generation, generation, out)
    write_core(out / "ram.img", out / "ram.elf")
    return out


@pytest.fixture(scope="session")
def cap72(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """7.2 at the jump: kho-v4, luo-v5, one memfd-v2 of tools.generations.PAYLOAD."""
    return _captured(tmp_path_factory, "7.2")


@pytest.fixture(scope="session")
def cap619(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6.19 at the jump: kho-v1 bitmaps, luo-v1 FDT, one memfd-v1."""
    return _captured(tmp_path_factory, "6.19")


def write_example(out: Path, generation: str) -> Path:
    """luoctl example's bytes, written as the command does (sparse ram.img)."""
    example.write(example.build(generation, 1 << 30, 16), out)
    return out
