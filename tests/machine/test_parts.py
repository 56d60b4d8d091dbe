"""The machine's parts in process: the state table, the console's tail and waits, the control
and link handler tables (no machine process, no kernel)."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from liveupdate.errors import LiveUpdateError
from liveupdate.machine import console as console_mod
from liveupdate.machine import control, machine
from liveupdate.machine.console import Console
from liveupdate.machine.state import STOPPED, TRANSITIONS, State, parse_states


def test_every_state_has_its_transitions_and_stopped_states_can_power_on() -> None:
    assert set(TRANSITIONS) == set(State)
    for s in State:
        assert State.OFF in TRANSITIONS[s]  # the power can always be cut
    assert {State.OFF, State.PANIC} == STOPPED
    assert TRANSITIONS[State.PANIC] == {State.OFF}  # out of a panic only through off


@pytest.mark.parametrize("names", [None, [], "running", ["running", "asleep"]])
def test_parse_states_rejects_what_is_not_a_list_of_states(names: object) -> None:
    with pytest.raises(LiveUpdateError) as e:
        parse_states(names)
    assert e.value.errno == errno.EINVAL


def test_parse_states() -> None:
    assert parse_states(["panic", "running"]) == [State.PANIC, State.RUNNING]


def _console(tmp_path: Path) -> Console:
    return Console(str(tmp_path / "console.log"), threading.Condition())


def test_console_keeps_a_tail_in_memory_and_all_of_it_in_the_file(tmp_path: Path) -> None:
    c = _console(tmp_path)
    lines = [f"line {i:06d}\n".encode() for i in range(20000)]  # 240 KiB > CONSOLE_KEEP
    for line in lines:
        c.append(line)
    whole = b"".join(lines)
    assert c.end == len(whole)
    assert len(c.tail) <= console_mod.CONSOLE_KEEP and c.base > 0
    with c.cond:
        assert c.since(0) == (0, whole)  # the old part from the file
        assert c.since(c.base + 5) == (c.base + 5, whole[c.base + 5 :])
        assert c.since(-3) == (0, whole)


def test_console_wait_finds_the_line_from_an_offset(tmp_path: Path) -> None:
    c = _console(tmp_path)
    c.append(b"boot: one\nluod: listening\nboot: two\n")
    got = c.wait("boot: .*", 5, 1.0, lambda: None)
    assert got["line"] == "boot: two" and got["start"] == len(b"boot: one\nluod: listening\n")
    late = threading.Thread(target=c.append, args=(b"vmm vm0: started\n",))
    late.start()
    assert c.wait("vmm vm0", 0, 10.0, lambda: None)["line"] == "vmm vm0: started"
    late.join()


def test_console_wait_ends_when_nothing_more_can_come(tmp_path: Path) -> None:
    c = _console(tmp_path)
    with pytest.raises(LiveUpdateError) as e:
        c.wait("never", 0, 10.0, lambda: "machine is panic (oops)")
    assert e.value.errno == errno.EIO and "machine is panic (oops)" in e.value.message
    with pytest.raises(LiveUpdateError) as e:
        c.wait("never", 0, 0.01, lambda: None)
    assert e.value.errno == errno.ETIMEDOUT
    with pytest.raises(LiveUpdateError) as e:
        c.wait("(", 0, 1.0, lambda: None)
    assert e.value.errno == errno.EINVAL


def test_the_request_tables_cover_every_op() -> None:
    assert set(control.CONTROL) == {"status", "power_on", "power_off", "power_cycle",
                                    "console", "wait", "wait_state", "run", "kho_status",
                                    "debugfs", "maps", "ram_read", "ram_write", "device_wait",
                                    "dma_log", "shutdown"}
    assert set(machine.LINK) == {"booted", "ready", "settled", "jump", "panic", "poweroff",
                                 "restart"}


def test_is_guest_is_this_process_and_its_descendants_only() -> None:
    assert control.is_guest(os.getpid())
    assert not control.is_guest(os.getppid())
    assert not control.is_guest(1)
