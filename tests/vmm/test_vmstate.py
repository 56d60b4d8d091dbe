"""The VMM's saved state as described data: round trip, versions, sections, hostile bytes."""

from __future__ import annotations

import contextlib
import json
import struct
import zlib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from liveupdate.errors import AbiError
from liveupdate.vmm import cpu, vmstate
from liveupdate.vmm.vmstate import Description, Field, Section

SIZE = 64 << 10
VALUES: dict[str, dict[str, Any]] = {
    "vm": {"size": 1 << 30, "accel": "tcg", "steps": 12, "tsc_hz": 2.5e9,
           "last_exit_ns": 99, "paused_wall": 1.5, "ring": [1, 2, 3],
           "last_exit_wall_ns": 1_400_000_000},
    "cpu0": cpu.fresh().to_json()}


def _record(sections: list[dict[str, Any]], version: int = vmstate.FORMAT_VERSION) -> bytes:
    payload = json.dumps({"sections": sections}).encode()
    return vmstate.HEADER.pack(vmstate.MAGIC, version, 0, len(payload),
                               zlib.crc32(payload)) + payload


def test_round_trip_with_magic_and_version() -> None:
    raw = vmstate.VM_STATE.encode(VALUES, SIZE)
    assert len(raw) == SIZE and raw.startswith(vmstate.MAGIC)
    assert vmstate.VM_STATE.decode(raw) == VALUES
    assert cpu.CpuState.from_json(vmstate.VM_STATE.decode(raw)["cpu0"]) == cpu.fresh()


def test_a_version_1_vm_section_still_reads_without_the_realtime_pause() -> None:
    """A VMM before the REALTIME pause (section vm version 1) hands over to this one: its
    record reads, without ``last_exit_wall_ns`` (the VMM falls back to ``paused_wall``)."""
    v1 = {k: v for k, v in VALUES["vm"].items() if k != "last_exit_wall_ns"}
    sections = [{"name": "vm", "version": 1, "required": True, "fields": v1},
                vmstate.CPU0.encode(VALUES["cpu0"])]
    assert vmstate.VM_STATE.decode(_record(sections))["vm"] == v1
    sections[0]["version"] = 2  # a version 2 record without it is malformed
    with pytest.raises(AbiError, match="field last_exit_wall_ns is not a u64"):
        vmstate.VM_STATE.decode(_record(sections))


def test_an_unknown_required_section_is_a_precise_error() -> None:
    sections = [vmstate.VM.encode(VALUES["vm"]), vmstate.CPU0.encode(VALUES["cpu0"]),
                {"name": "vfio0", "version": 1, "required": True, "fields": {}}]
    with pytest.raises(AbiError, match=r"required section 'vfio0' .* unknown to this VMM"):
        vmstate.VM_STATE.decode(_record(sections))
    sections[-1]["required"] = False  # optional: skipped, like a QEMU subsection
    assert set(vmstate.VM_STATE.decode(_record(sections))) == {"vm", "cpu0"}


def test_a_missing_required_section_is_named() -> None:
    with pytest.raises(AbiError, match="required section cpu0 is missing"):
        vmstate.VM_STATE.decode(_record([vmstate.VM.encode(VALUES["vm"])]))


def test_section_versions_newer_or_below_the_minimum_are_refused() -> None:
    dev1 = Section("dev", 2, 2, (Field("a", "u64"), Field("b", "u64", since=2)))
    desc = Description((dev1,))
    with pytest.raises(AbiError, match="version 3 is newer than this VMM's 2"):
        desc.decode(_record([{"name": "dev", "version": 3, "fields": {"a": 1, "b": 2}}]))
    with pytest.raises(AbiError, match="older than the oldest this VMM reads"):
        desc.decode(_record([{"name": "dev", "version": 1, "fields": {"a": 1}}]))
    old = Description((Section("dev", 2, 1, dev1.fields),))  # reads v1: b came in v2
    assert old.decode(_record([{"name": "dev", "version": 1, "fields": {"a": 1}}])) == \
        {"dev": {"a": 1}}


def test_a_field_of_the_wrong_kind_is_named() -> None:
    bad = dict(VALUES["vm"], steps=-1)
    with pytest.raises(AbiError, match="section vm field steps is not a u64"):
        vmstate.VM_STATE.decode(_record([vmstate.VM.encode(bad),
                                         vmstate.CPU0.encode(VALUES["cpu0"])]))


@pytest.mark.parametrize("raw, why", [
    (b"", "shorter than its header"),
    (b"X" * 64, "bad magic"),
    (_record([], version=2), "format version 2"),
    (vmstate.HEADER.pack(vmstate.MAGIC, 1, 0, 4, 0) + b"{}  ", "checksum"),
    (_record([]).replace(b'"sections": []', b'"sections": 7'.ljust(14)), "length or"),
])
def test_hostile_headers(raw: bytes, why: str) -> None:
    with pytest.raises(AbiError, match=why):
        vmstate.VM_STATE.decode(raw)


def test_state_that_does_not_fit_is_refused() -> None:
    with pytest.raises(AbiError, match="does not fit"):
        vmstate.VM_STATE.encode(VALUES, 64)


@given(st.binary(max_size=512))
def test_garbage_is_one_error_type(raw: bytes) -> None:
    with contextlib.suppress(AbiError):  # anything else escapes and fails the test
        vmstate.VM_STATE.decode(vmstate.MAGIC + struct.pack("<HH", 1, 0) + raw)
