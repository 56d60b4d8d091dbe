"""kho_restore_folio in bulk: every page of each restored folio gets its refcount (the head
1, the tails 0, as prep_compound_page leaves them), small folios and 1 GiB ones alike, and
nothing outside them changes."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from liveupdate.abi.consts import PAGE_SHIFT
from liveupdate.kernel.kho.incoming import KhoIn
from liveupdate.kernel.mm.pages import PageMeta

NR = 1 << 22  # 16 GiB of page frames: room for 1 GiB folios at 1, 5 and 9 GiB


def _kin(meta: PageMeta) -> KhoIn:
    none: Any = None
    return KhoIn(SimpleNamespace(meta=meta), SimpleNamespace(restore_caps_order=False),  # type: ignore[arg-type]
                 0, b"", none, none, 0, 0, none)


@pytest.mark.parametrize("order", [0, 2, 9, 18])
def test_every_page_of_each_folio_and_nothing_else(order: int) -> None:
    meta = PageMeta(NR)
    meta.refcount[:] = 7
    n = 1 << order
    heads = np.array([n, 5 * n, 9 * n], np.int64)
    meta.mark_kho_preserved(heads << PAGE_SHIFT, np.full(3, order))
    foreign = 2 * n  # not preserved: stays as it was
    ok = _kin(meta).restore_folios(np.append(heads, foreign) << PAGE_SHIFT, order)
    assert ok.tolist() == [True, True, True, False]
    for h in heads.tolist():
        assert meta.refcount[h] == 1 and meta.order[h] == order
        assert not meta.refcount[h + 1 : h + n].any()
        assert meta.refcount[h + n] == 7 and meta.refcount[h - 1] == 7
    assert meta.refcount[foreign] == 7 and meta.private[heads].tolist() == [0, 0, 0]


@pytest.mark.parametrize("order", [2, 9])
def test_adjacent_folios_and_a_gap(order: int) -> None:
    meta = PageMeta(NR)
    meta.refcount[:] = 7
    n = 1 << order
    heads = np.array([3 * n, n, 2 * n, 7 * n], np.int64)  # unsorted: a run of three, one apart
    meta.mark_kho_preserved(heads << PAGE_SHIFT, np.full(4, order))
    assert _kin(meta).restore_folios(heads << PAGE_SHIFT, order).all()
    want = np.full(8 * n + 1, 7, np.int32)
    want[n : 4 * n] = 0
    want[7 * n : 8 * n] = 0
    want[heads] = 1
    assert meta.refcount[: 8 * n + 1].tolist() == want.tolist()
