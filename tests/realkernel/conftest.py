"""The real-kernel suite runs only from ./scripts/test-realkernel (it builds and boots Linux
under QEMU: minutes, two cores); in the fast suite its tests skip, saying how to run them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from liveupdate.realkernel import build
from liveupdate.realkernel.build import Image

ENV = "LIVEUPDATE_REALKERNEL"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def image() -> Image:
    """The 7.3 image with KHO + LUO: built once (cached across runs by the build)."""
    return build.build()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get(ENV) == "1":
        return
    skip = pytest.mark.skip(reason="real-kernel suite: run ./scripts/test-realkernel")
    for item in items:
        if item.get_closest_marker("realkernel") is not None:
            item.add_marker(skip)
