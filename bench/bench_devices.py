"""Blackout of a VM with a NIC assigned against one without, in the same live updates
(issue #25): one ``7.3+posted`` machine (sanitizer on) running luod, ``vm0`` -- 64 MiB, the
NIC guest, its NIC preserved in continuous mode (DMA never stops) -- and ``vm1`` -- 64 MiB,
the memory-walking guest, no device -- both under TCG, live-updated --runs times in a row
through luod. Each update pauses both VMs at once, so the two blackouts (host clock, last exit
before the pause to the first entry after the resume) are measured on the same kexec.

Run: .venv/bin/python bench/bench_devices.py [--runs 5] [--mode continuous|posted]

Target (issue #25): the device adds at most max(10 %, 20 ms) to the median blackout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from liveupdate.abi import image
from liveupdate.client.update import load_image, run_update
from liveupdate.ipc.service import ask
from liveupdate.machine.client import start

CMDLINE = "kho=on liveupdate=on intel_iommu=on vfio-pci.ids=1b36:11b0"


def run(runs: int, mode: str) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"vm0": [], "vm1": []}
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        folder = Path(tmp) / "m"
        disk = folder / "disk"
        (disk / "images").mkdir(parents=True)
        (disk / "images" / "next.img").write_bytes(image.KernelImage.of("7.3+posted").encode())
        py = sys.executable
        (disk / "services").write_text(
            f"@restart {py} -m liveupdate.cli.luod --finish-timeout 60\n"
            f"@restart {py} -m liveupdate.vmm vm0 --memory 64M --accel tcg "
            "--nic /dev/vfio/devices/vfio0\n"
            f"@restart {py} -m liveupdate.vmm vm1 --memory 64M --accel tcg\n")
        proc, m = start(str(folder), memory=1 << 30, image="images/next.img",
                        cmdline=f"{CMDLINE} liveupdate_devices={mode}", log=f"{folder}.log",
                        devices=[{"kind": "nic", "bdf": "00:03.0", "rate": 400}])
        try:
            m.booted(60)
            m.wait("luod: LUO .* listening", timeout=120)
            for vm in out:
                m.wait(f"vmm {vm}: .* started", timeout=120)
            luod = os.path.join(folder, "run", "luod.sock")
            for _ in range(runs):
                load_image(luod, "images/next.img")
                off = m.status()["console_bytes"]
                run_update(luod)
                for vm in out:
                    m.wait(f"vmm {vm}: .* resumed", offset=off, timeout=120)
                    st = ask(os.path.join(folder, "run", f"vmm-{vm}.sock"), "status")
                    out[vm].append(float(st["blackout"]["host_s"]))
        finally:
            m.shutdown()
            proc.wait(30)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--mode", choices=("continuous", "posted"), default="continuous")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    got = run(args.runs, args.mode)
    with_dev, without = statistics.median(got["vm0"]), statistics.median(got["vm1"])
    extra = with_dev - without
    limit = max(0.10 * without, 0.020)
    if args.json:
        print(json.dumps({"runs": got, "median_with_device_s": with_dev,
                          "median_without_s": without, "extra_s": extra,
                          "limit_s": limit, "within": extra <= limit}))
        return
    t = Table(title=f"blackout, {args.runs} live updates ({args.mode} device, sanitizer on, "
                    "TCG, 64 MiB guests)")
    for col in ("VM", "median s", "runs s"):
        t.add_column(col, justify="right")
    t.add_row("vm0 (NIC assigned)", f"{with_dev:.3f}", " ".join(f"{x:.3f}" for x in got["vm0"]))
    t.add_row("vm1 (no device)", f"{without:.3f}", " ".join(f"{x:.3f}" for x in got["vm1"]))
    Console().print(t)
    Console().print(f"the device adds {extra * 1e3:+.1f} ms (target: at most "
                    f"{limit * 1e3:.1f} ms): {'within' if extra <= limit else 'OVER'}")


if __name__ == "__main__":
    main()
