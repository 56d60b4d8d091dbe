"""The devices section of docs/reliability.md (:mod:`liveupdate.scenario.reliability`): rendered
from the device cells' records in the fault table's order, replacing the section a matrix
already has and leaving the rest of it as it was; written only when every cell ran."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from liveupdate.scenario import device_faults, reliability
from liveupdate.scenario.device_faults import DEVICE_FAULTS

MAIN = "# Reliability matrix\n\n## Totals\n\nmain rows\n"


def _rec(name: str, **more: Any) -> dict[str, Any]:
    return {"fault": name, "gaps": 3, "bad": 0, "out_of_order": 0, "iommu_faults": 1,
            "dma_errors": 0, "dma_writes": 40, "dma_outside": 0, "found_running": False,
            "lost": "", "restored": True, "outcome": "updated", **more}


def test_rows_follow_the_fault_table_with_the_observed_counts() -> None:
    records = [_rec(f.name) for f in reversed(DEVICE_FAULTS)]
    assert reliability.complete(records) and not reliability.complete(records[1:])
    text = reliability.render_devices(records)
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert [r.split("`")[1] for r in rows] == [f.name for f in DEVICE_FAULTS]
    assert "| updated | 3 | 0 | 1 | 40 (0) | told: device found reset |" in rows[0]


def test_the_section_replaces_the_old_one_and_keeps_the_main_matrix() -> None:
    first = reliability.with_devices(MAIN, [_rec(DEVICE_FAULTS[0].name, gaps=7)])
    again = reliability.with_devices(first, [_rec(DEVICE_FAULTS[0].name, gaps=9)])
    assert again.startswith(MAIN.rstrip("\n")) and again.count(reliability.DEVICES) == 1
    assert "| 9 |" in again and "| 7 |" not in again
    assert reliability.devices_section(again).startswith(reliability.DEVICES)
    assert reliability.devices_section(MAIN) == ""


def test_records_are_written_only_when_collected(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.delenv(device_faults.RECORDS_ENV, raising=False)
    device_faults.record("x", {"gaps": 1})
    monkeypatch.setenv(device_faults.RECORDS_ENV, str(tmp_path))
    device_faults.record("pci-flb-not-honoured", {"gaps": 2})
    assert device_faults.load(tmp_path) == [{"fault": "pci-flb-not-honoured", "gaps": 2}]
