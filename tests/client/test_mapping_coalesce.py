"""Physically adjacent extents map as one (one mmap, one entry in a control reply)."""

from __future__ import annotations

from liveupdate.client.mapping import coalesce


def test_adjacent_extents_merge_and_gaps_stay() -> None:
    mib = 1 << 20
    got = coalesce([(0, 2 * mib), (2 * mib, 2 * mib), (8 * mib, mib), (9 * mib, mib),
                    (4 * mib, mib)])
    assert got == [(0, 4 * mib), (8 * mib, 2 * mib), (4 * mib, mib)]  # order kept
    assert coalesce([]) == [] and coalesce([(5, 1)]) == [(5, 1)]
