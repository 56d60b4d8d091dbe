"""``luoctl demo --devices``: one continuous-mode machine through the command line, its JSON
report as defined (every packet of the blackout delivered, nothing lost, no fault, no DMA
outside the preserved guest memory) and its timeline picture written."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from liveupdate.cli.luoctl import main


def test_demo_devices_continuous(tmp_path: Path) -> None:
    png = tmp_path / "devices.png"
    r = CliRunner().invoke(main, ["demo", "--dir", str(tmp_path / "d"), "--devices",
                                  "continuous", "--json", "--plot", str(png)])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    (vm,) = out["vms"]
    assert out["ok"] and vm["mode"] == "continuous" and vm["found_running"]
    assert vm["delivered_in_blackout"] > 0 and vm["gaps"] == vm["drops"] == 0
    assert vm["iommu_faults"] == 0 and vm["dma_outside_preserved"] == 0 and vm["dma_writes"]
    assert png.stat().st_size > 0
