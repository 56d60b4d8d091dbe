"""A VMM's RAM extents come back whole however many there are: ``where`` answers a piece
at a time and the asker joins them (an 8 GiB guest on scattered 2 MiB folios has thousands,
more than one reply record holds)."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from liveupdate.errors import LiveUpdateError
from liveupdate.ipc import service
from liveupdate.vmm.vmm import Vmm
from liveupdate.vmm.where import WHERE_PIECE, where


def _serve(tmp_path: Path, extents: list[tuple[int, int]]) -> tuple[str, Any]:
    fake: Any = SimpleNamespace(size=8 << 30, extents=extents, state_ranges=[], ram_fd=3,
                                state_fd=4, restored_cpu=None)
    path = str(tmp_path / "vmm.sock")
    srv = service.listen(path)
    threading.Thread(target=service.serve, args=(srv, {"where": lambda m: Vmm.where(fake, m)}),
                     daemon=True).start()
    return path, srv


@pytest.mark.parametrize("n", [0, 5, WHERE_PIECE, 2 * WHERE_PIECE + 452])
def test_every_extent_in_order(tmp_path: Path, n: int) -> None:
    extents = [(i << 22, 2 << 20) for i in range(n)]
    path, srv = _serve(tmp_path, extents)
    try:
        got = where(path)
        assert [tuple(e) for e in got["ram"]] == extents and got["ram_total"] == n
        with pytest.raises(LiveUpdateError):
            service.ask(path, "where", **{"from": -1})
    finally:
        srv.close()
