"""The cache's table (open addressing in the memfd it preserves) and its request table."""

from __future__ import annotations

import errno
from typing import Any

import pytest

from liveupdate.errors import LiveUpdateError
from liveupdate.ipc import service
from liveupdate.userspace import kvcache


def _table(slots: int = 8) -> kvcache.Table:
    return kvcache.Table(memoryview(bytearray(slots * kvcache.SLOT)))


def test_put_get_count_and_overwrite() -> None:
    t = _table()
    t.put(b"a", b"1")
    t.put(b"b", b"2")
    t.put(b"a", b"3")
    assert (t.get(b"a"), t.get(b"b"), t.get(b"c"), t.count()) == (b"3", b"2", None, 2)


def test_a_table_over_the_same_bytes_sees_the_same_data() -> None:
    """What survives the kexec is the memfd's bytes: a new Table over them is the cache."""
    raw = bytearray(8 * kvcache.SLOT)
    kvcache.Table(memoryview(raw)).put(b"key", b"value")
    assert kvcache.Table(memoryview(raw)).get(b"key") == b"value"


def test_limits_and_a_full_table() -> None:
    t = _table(2)
    with pytest.raises(LiveUpdateError) as e:
        t.put(b"k" * (kvcache.KEY_MAX + 1), b"")
    assert e.value.errno == errno.EINVAL
    t.put(b"x", b"")
    t.put(b"y", b"")
    with pytest.raises(LiveUpdateError) as e:
        t.put(b"z", b"")
    assert e.value.errno == errno.ENOSPC


def test_fnv1a_matches_the_reference_vectors() -> None:
    assert kvcache.fnv1a(b"") == 0xCBF29CE484222325
    assert kvcache.fnv1a(b"a") == 0xAF63DC4C8601EC8C


class _Cache(kvcache.Cache):
    def __init__(self) -> None:  # the table without a luod
        self.limited = False
        self.restored = False
        self.table = _table()


def test_requests_go_through_the_table_and_limited_mode_refuses_puts() -> None:
    c = _Cache()

    def ask(**msg: Any) -> dict[str, Any]:
        return service.dispatch(c.handlers, msg, "kvcache: ")

    assert ask(op="put", key="k", value="v")["ok"]
    assert ask(op="get", key="k")["value"] == "v"
    assert ask(op="stats")["keys"] == 1
    c.limited = True
    assert ask(op="put", key="k", value="w")["errno"] == "EBUSY"
    assert ask(op="get", key=1)["errno"] == "EINVAL"
    assert ask(op="drop")["error"] == "kvcache: unknown op 'drop'"
