"""Whole machines as real processes: a machine process, kernel processes, userspace."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from liveupdate.abi import generations, image
from liveupdate.machine.client import MachineClient, start

GiB = 1 << 30
Factory = Callable[..., MachineClient]
Machine = Callable[..., MachineClient]
CMDLINE = "kho=on liveupdate=on transparent_hugepage_shmem=within_size"
IMAGES = {g: image.KernelImage.of(g) for g in generations.RELEASES}


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[Factory]:
    """``machine(cmdline=..., memory=...)`` starts a machine and waits for its kernel."""
    running: list[tuple[subprocess.Popen[bytes], MachineClient]] = []

    def make(cmdline: str = "kho=on", memory: int = GiB, wait: bool = True,
             image: str = "") -> MachineClient:
        folder = tmp_path / f"m{len(running)}"
        proc, client = start(str(folder), memory=memory, cmdline=cmdline, image=image,
                             log=str(tmp_path / f"m{len(running)}.log"))
        running.append((proc, client))
        if wait:
            client.booted(60)
        return client

    yield make
    for proc, client in running:
        client.shutdown()
        proc.wait(30)


@pytest.fixture
def lu(machine: Factory, tmp_path: Path) -> Machine:
    """``lu(gen, extra, memory)``: a LUO machine booted from generation ``gen``'s image, with
    every generation's image on its disk (``images/<gen>.img``) for the kexecs."""
    def make(gen: str = "6.19", extra: str = "", memory: int = GiB) -> MachineClient:
        images = tmp_path / "m0" / "disk" / "images"
        images.mkdir(parents=True, exist_ok=True)
        for name, img in IMAGES.items():
            (images / f"{name}.img").write_bytes(img.encode())
        return machine(f"{CMDLINE} {extra}".strip(), memory=memory, image=f"images/{gen}.img")
    return make


V3 = "images/v3.img"


@pytest.fixture
def v3(machine: Factory, tmp_path: Path) -> Callable[..., MachineClient]:
    """``v3(extra, memory)``: a machine booted from a LUO v3 image (6.17), the one on its
    disk for the kexecs."""
    def make(extra: str = "", memory: int = GiB) -> MachineClient:
        images = tmp_path / "m0" / "disk" / "images"
        images.mkdir(parents=True, exist_ok=True)
        (images / "v3.img").write_bytes(
            image.KernelImage(release="6.17.0-lu-v3", luo="v3").encode())
        return machine(f"{CMDLINE} {extra}".strip(), memory=memory, image=V3)
    return make
