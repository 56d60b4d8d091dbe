"""luod's registry crosses the kexec in a memfd: it round-trips, and any damage is one
error (the next luod then starts empty and reclaims at FINISH)."""

from __future__ import annotations

import struct
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from liveupdate.errors import AbiError
from liveupdate.luod import registry
from liveupdate.luod.state import Event, Phase, next_phase


def sample() -> registry.Registry:
    return registry.Registry("6.19", 3, [
        registry.ClientRecord(0, "vm0", {1: 0x4C554F4400000001}, "0:vm0"),
        registry.ClientRecord(1000, "cache", {}, "1000:cache")], {"start": 1.5, "reboot": 2.0})


def test_round_trip_and_fixed_size() -> None:
    raw = sample().encode()
    assert len(raw) == registry.SIZE and registry.decode(raw) == sample()


@pytest.mark.parametrize("damage, message", [
    (lambda r: b"X" + r[1:], "bad magic"),
    (lambda r: r[:8] + struct.pack("<I", registry.SIZE) + r[12:], "bad magic or length"),
    (lambda r: r[:20] + bytes([r[20] ^ 1]) + r[21:], "checksum"),
    (lambda r: r[:10], "shorter than its header"),
])
def test_damage_is_one_error(damage: object, message: str) -> None:
    with pytest.raises(AbiError, match=message):
        registry.decode(damage(sample().encode()))  # type: ignore[operator]


@given(st.binary(max_size=300))
def test_hostile_payloads(payload: bytes) -> None:
    raw = registry.HEADER.pack(registry.MAGIC, len(payload), zlib.crc32(payload)) + payload
    try:
        reg = registry.decode(raw)
    except AbiError:
        return
    assert isinstance(reg, registry.Registry)


def test_state_machine_declared_once() -> None:
    assert next_phase(Phase.NORMAL, Event.PREPARE) is Phase.PREPARED
    assert next_phase(Phase.FROZEN, Event.CANCEL) is Phase.NORMAL
    with pytest.raises(Exception, match="cannot finish while normal"):
        next_phase(Phase.NORMAL, Event.FINISH)
