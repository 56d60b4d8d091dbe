"""Whole machines as real processes: a machine process, kernel processes, userspace."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from liveupdate.machine.client import MachineClient, start

GiB = 1 << 30
Factory = Callable[..., MachineClient]


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
