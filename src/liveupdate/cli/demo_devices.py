"""``luoctl demo --devices``: the devices scenario (:mod:`liveupdate.scenario.devices`)
rendered -- a table per VM, JSON, and a timeline picture of each VM's packets around its
blackout."""

from __future__ import annotations

import json
import sys
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from liveupdate.errors import LiveUpdateError
from liveupdate.scenario import devices


def render(results: list[devices.DeviceVm]) -> None:
    console = Console()
    t = Table(title="VMs with a NIC assigned, across a live update")
    for col in ("vm", "mode", "ring", "blackout", "delivered in blackout", "received",
                "gaps", "bad", "drops", "IOMMU faults", "DMA outside preserved", "verdict"):
        t.add_column(col, justify="right")
    for r in results:
        t.add_row(r.vm, r.mode, str(r.ring), f"{r.blackout_s:.3f} s",
                  str(r.delivered_in_blackout), f"{r.received_before} -> {r.received_after}",
                  str(r.gaps), str(r.bad), str(r.drops), str(r.iommu_faults),
                  f"{r.dma_outside_preserved} of {r.dma_writes}",
                  "as defined" if r.ok else "; ".join(r.problems))
    console.print(t)
    ok = all(r.ok for r in results)
    console.print("[bold green]devices: as defined[/]" if ok else "[bold red]devices: FAILED[/]")


def plot(results: list[devices.DeviceVm], path: str) -> None:
    """Per VM: the packets the device delivered while the guest was paused, by send time and
    sequence number, on the blackout's window (shaded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(10, 2.2 * len(results) + 0.6),
                             squeeze=False)
    for ax, r in zip(axes[:, 0], results, strict=True):
        t0 = r.paused_ns
        ax.axvspan(0, (r.resumed_ns - t0) / 1e9, color="tab:red", alpha=0.15,
                   label="guest paused (blackout)")
        if r.waiting:
            ax.plot([(s - t0) / 1e9 for _, s in r.waiting], [q for q, _ in r.waiting], ".",
                    ms=3, color="tab:blue", label="delivered by DMA during the pause")
        ax.set_title(f"{r.vm}, {r.mode}: {r.delivered_in_blackout} packets delivered in the "
                     f"blackout, {r.gaps} missing, {r.drops} drops", fontsize=9)
        ax.set_ylabel("sequence number", fontsize=8)
        ax.legend(fontsize=7, loc="upper left")
    axes[-1, 0].set_xlabel("seconds since the guest's pause (host clock)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(folder: str, mode: str, vms: int, ring: int, accel: str, as_json: bool,
        plot_path: str | None, say: Any) -> None:
    modes = devices.MODES if mode == "both" else (mode,)
    try:
        results = devices.run(folder, modes, vms, ring, accel, say)
    except LiveUpdateError as e:
        click.echo(f"luoctl: {e}", err=True)
        sys.exit(1)
    if plot_path:
        plot(results, plot_path)
    if as_json:
        click.echo(json.dumps(devices.to_json(results), indent=2))
    else:
        render(results)
    sys.exit(0 if all(r.ok for r in results) else 1)
