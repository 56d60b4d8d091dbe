"""Where the emulated kernel deliberately answers differently from the real Linux 7.3.

Each :class:`Deviation` names the steps of the differential suite it explains (scenario,
stage, step index within the stage) and why; the code that deviates says so in its
docstring too. The fast suite fails on a difference not listed here and on a listed one
that no longer happens.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Deviation:
    name: str
    reason: str


Key = tuple[str, int, int]
KNOWN: dict[Key, Deviation] = {}


def _at(dev: Deviation, *keys: Key) -> None:
    for key in keys:
        KNOWN[key] = dev
