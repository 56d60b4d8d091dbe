"""Shared test helpers: a RAM buffer with an allocator, used to lay out handover structures."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from liveupdate.abi.consts import PAGE_SIZE
from liveupdate.abi.physmem import PhysMem

# Hypothesis's per-example deadline and "too slow" health check are timing checks: on a
# loaded 2-core host (the suite runs a worker per core plus one, beside QEMU in CI) they
# fail correct code. Performance is measured in bench/, never in tests.
settings.register_profile("suite", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("suite")


class FakeRam:
    """A small RAM (bytearray) at ``base``, with a page allocator."""

    def __init__(self, pages: int = 64, base: int = 0x100000) -> None:
        self.buf = bytearray(pages * PAGE_SIZE)
        self.base = base
        self.next = base

    def alloc(self, pages: int = 1) -> int:
        phys = self.next
        self.next += pages * PAGE_SIZE
        assert self.next <= self.base + len(self.buf), "FakeRam exhausted"
        return phys

    def put(self, phys: int, data: bytes | np.ndarray) -> None:
        raw = bytes(data)
        off = phys - self.base
        self.buf[off : off + len(raw)] = raw

    def mem(self) -> PhysMem:
        return PhysMem(self.buf, base=self.base)


@pytest.fixture
def ram() -> FakeRam:
    return FakeRam()


def dtc_available() -> bool:
    return shutil.which("dtc") is not None and shutil.which("fdtdump") is not None


needs_dtc = pytest.mark.skipif(
    not dtc_available(),
    reason="device-tree-compiler not installed (apt-get install device-tree-compiler)",
)


def dtc_decompile(blob: bytes) -> str:
    return subprocess.run(["dtc", "-q", "-I", "dtb", "-O", "dts", "-"], input=blob,
                          capture_output=True, check=True).stdout.decode()


def dtc_recompile(dts: str) -> bytes:
    return subprocess.run(["dtc", "-q", "-I", "dts", "-O", "dtb", "-"], input=dts.encode(),
                          capture_output=True, check=True).stdout


# -- the reliability matrix: records from tests/scenario/test_reliability.py -> docs/reliability.md;
# the generation matrix: tests/kernel/test_generations.py -> docs/generations.md
RECORDS_ENV = "LIVEUPDATE_RELIABILITY_RECORDS"
ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The long tests first, then the busy-guest group (one work unit of minutes, xdist
    group "vms"): a worker that starts one of them last runs alone at the end and the suite
    takes that much longer."""
    def late(item: pytest.Item) -> int:
        if item.get_closest_marker("long") is not None:
            return 0
        return 1 if item.get_closest_marker("xdist_group") is not None else 2

    items.sort(key=late)


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput") and RECORDS_ENV not in os.environ:
        # the controller picks the folder; xdist workers inherit it
        os.environ[RECORDS_ENV] = str(ROOT / "build" / "reliability" / uuid.uuid4().hex)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if hasattr(session.config, "workerinput"):
        return
    folder = Path(os.environ.get(RECORDS_ENV, ""))
    if not folder.is_dir():
        return
    from liveupdate.scenario import device_faults, reliability
    from liveupdate.scenario.faults import FAULTS

    doc = ROOT / "docs" / "reliability.md"
    text = old = doc.read_text() if doc.exists() else ""
    records = reliability.load(folder)
    if {r["fault"] for r in records} == {f.name for f in FAULTS}:  # the whole matrix ran
        text = reliability.render(records).rstrip("\n") + "\n\n" \
            + reliability.devices_section(old)
    devices = device_faults.load(folder)
    if reliability.complete(devices):  # every device fault cell ran
        text = reliability.with_devices(text, devices)
    if text.strip() and text != old:
        doc.write_text(text.rstrip("\n") + "\n")
    from liveupdate.scenario import generations

    cells = generations.load(folder / "generations") if (folder / "generations").is_dir() \
        else []
    if len(cells) == len(generations.MODES) * len(generations.GENERATIONS) ** 2:
        (ROOT / "docs" / "generations.md").write_text(generations.render(cells))
    shutil.rmtree(folder, ignore_errors=True)
