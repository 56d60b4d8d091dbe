"""The in-process rig (:mod:`liveupdate.scenario.inprocess`) as a fixture."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from liveupdate.scenario.inprocess import GiB, Rig

__all__ = ["GiB", "Rig"]


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


@pytest.fixture(autouse=True)
def _quiet(capsys: pytest.CaptureFixture[str]) -> Iterator[None]:
    yield
    os.environ.pop("LU_SYSCALL_FD", None)
