"""The guest and its accelerators, in-process: the invariants catch lost, zeroed, stale and
misplaced pages; a vCPU state saved from one accelerator instance continues in another."""

from __future__ import annotations

import ctypes
import mmap
import shutil
from collections.abc import Iterator

import numpy as np
import pytest

from liveupdate.vmm import cpu, guest, kvm
from liveupdate.vmm.tcg import Tcg
from liveupdate.vmm.vcpu import Accel
from tests.vmm import tsc

SIZE = 32 << 20
NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Python 3.12+; x86 Linux value


@pytest.fixture
def ram() -> Iterator[tuple[mmap.mmap, int]]:
    buf = mmap.mmap(-1, SIZE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    guest.layout(memoryview(buf), SIZE)
    yield buf, addr


KVM_REASON = kvm.unusable()
ACCELS = [pytest.param(Tcg, id="tcg"),
          pytest.param(kvm.Kvm, id="kvm", marks=pytest.mark.skipif(
              KVM_REASON is not None, reason=f"KVM is not usable here: {KVM_REASON}"))]


def run(accel: Accel, exits: int) -> None:
    for _ in range(exits):
        accel.run_to_exit()


@pytest.mark.parametrize("make", ACCELS)
def test_guest_walks_memory_and_verifies(ram: tuple[mmap.mmap, int], make: type) -> None:
    buf, addr = ram
    a = make(addr, SIZE)
    a.load(cpu.fresh())
    run(a, 6)  # 24576 steps over 7680 data pages: three passes and then some
    chk = guest.verify(memoryview(buf), SIZE)
    assert chk.ok and chk.steps == 6 * guest.STEPS_PER_EXIT and chk.pages_touched == 7680
    ts = guest.ring(memoryview(buf))
    assert len(ts) == 6 and ts == sorted(ts)  # the guest's clock moves forward


@pytest.mark.parametrize("make", ACCELS)
def test_state_moves_between_accelerator_instances(ram: tuple[mmap.mmap, int],
                                                   make: type) -> None:
    buf, addr = ram
    a = make(addr, SIZE)
    a.load(cpu.fresh())
    run(a, 3)
    st = cpu.CpuState.from_json(a.save().to_json())  # as through the state memfd
    b = make(addr, SIZE)
    b.load(st)
    run(b, 2)
    chk = guest.verify(memoryview(buf), SIZE)
    assert chk.ok and chk.steps == 5 * guest.STEPS_PER_EXIT  # continued, not restarted
    if getattr(b, "tsc_settable", False):  # KVM: the guest TSC is state, and it was set
        assert guest.ring(memoryview(buf))[-1] > st.tsc


@pytest.mark.parametrize("damage, problem", [
    ("zero", "sum to"),
    ("stale", "sum to"),
    ("misplace", "another page's tag"),
    ("checksum", "running checksum"),
])
def test_every_kind_of_damage_is_caught(ram: tuple[mmap.mmap, int], damage: str,
                                        problem: str) -> None:
    buf, addr = ram
    a = Tcg(addr, SIZE)
    a.load(cpu.fresh())
    run(a, 2)
    words = np.frombuffer(buf, np.uint64)
    page = (guest.DATA_AT + 11 * guest.PAGE) // 8
    other = (guest.DATA_AT + 12 * guest.PAGE) // 8
    if damage == "zero":
        words[page : page + 2] = 0
    elif damage == "stale":
        words[page] -= np.uint64(1)
    elif damage == "misplace":
        words[page : page + guest.PAGE // 8] = words[other : other + guest.PAGE // 8]
    else:
        words[(guest.STATE_AT + guest.CSUM) // 8] += np.uint64(1)
    chk = guest.verify(memoryview(buf), SIZE)
    assert not chk.ok and problem in chk.problem


def test_cpu_state_from_a_hostile_record_is_refused() -> None:
    good = cpu.fresh().to_json()
    for bad in ({**good, "regs": {**good["regs"], "rip": -1}},
                {**good, "regs": {"rip": 1}}, {**good, "cr3": "x"}):
        with pytest.raises(ValueError):
            cpu.CpuState.from_json(bad)


@pytest.mark.skipif(shutil.which("as") is None or shutil.which("objcopy") is None,
                    reason="GNU binutils (as, objcopy) not installed: apt-get install "
                           "binutils")
def test_checked_in_guest_bytes_rebuild_from_source() -> None:
    assert guest.assemble() == guest.CODE




def _walked(ram: tuple[mmap.mmap, int], make: type = Tcg, exits: int = 2) -> tuple[Accel, int]:
    _buf, addr = ram
    a = make(addr, SIZE)
    a.load(cpu.fresh())
    run(a, exits)
    return a, addr


LAST = guest.DATA_AT + (SIZE - guest.DATA_AT) // guest.PAGE * guest.PAGE - guest.PAGE


@pytest.mark.parametrize("at", [
    guest.DATA_AT + 3 * guest.PAGE + 16,  # the first byte the old check did not read
    guest.DATA_AT + 200 * guest.PAGE + 2049,
    guest.DATA_AT + 5000 * guest.PAGE + 4095,  # the last byte of a page
    LAST + 4095,  # the last byte of the guest
    guest.DATA_AT + 9 * guest.PAGE + 3,  # a counter
    guest.STATE_AT + 0x40,  # the state page beside its fields
    guest.STATE_AT + guest.SECRET + 7,
    guest.PD_AT + 8 * 3 + 7,  # a page-directory entry
    guest.CODE_AT + len(guest.CODE) - 1,  # the code
    guest.STACK_TOP - 1,
    0,
])
def test_one_flipped_byte_anywhere_is_caught(ram: tuple[mmap.mmap, int], at: int) -> None:
    """Every byte of guest memory is known: a single flipped bit of any of them fails the
    check, and a data page's damage is named by page and byte."""
    buf, _ = ram
    a, _ = _walked(ram)
    secret = a.save().regs[guest.SECRET_REG]  # the mirror is known from the saved vCPU
    assert guest.verify(memoryview(buf), SIZE, secret).ok
    buf[at] ^= 0x01
    chk = guest.verify(memoryview(buf), SIZE, secret)
    assert not chk.ok, hex(at)
    page, off = divmod(at - guest.DATA_AT, guest.PAGE)
    if at >= guest.DATA_AT and off >= 8:
        assert f"page {guest.DATA_AT + page * guest.PAGE:#x} byte {off} " in chk.problem


def test_a_zeroed_tail_and_two_swapped_pages_are_caught(ram: tuple[mmap.mmap, int]) -> None:
    buf, _ = ram
    _walked(ram)
    a, b = guest.DATA_AT + 40 * guest.PAGE, guest.DATA_AT + 41 * guest.PAGE
    saved = bytes(buf[a : a + guest.PAGE])
    buf[a + 2048 : a + guest.PAGE] = bytes(2048)
    assert "byte 2048 is not the page's fill" in guest.verify(memoryview(buf), SIZE).problem
    buf[a : a + guest.PAGE] = saved
    assert guest.verify(memoryview(buf), SIZE).ok
    other = bytes(buf[b : b + guest.PAGE])  # pages 40 and 41 have equal counters: only
    buf[b : b + guest.PAGE], buf[a : a + guest.PAGE] = saved, other  # their bytes tell
    assert "another page's tag" in guest.verify(memoryview(buf), SIZE).problem


def test_one_byte_that_happens_to_spell_another_page_is_a_changed_byte(
        ram: tuple[mmap.mmap, int]) -> None:
    """Byte 1 of a fill word xor 0x10 turns the page's tag into its neighbour's: a flip, not
    a misplaced page (the whole page would carry the other tag)."""
    buf, _ = ram
    _walked(ram)
    a = guest.DATA_AT + 40 * guest.PAGE
    buf[a + 2049] ^= 0x10
    assert "byte 2049 is not the page's fill" in guest.verify(memoryview(buf), SIZE).problem


@pytest.mark.parametrize("make", ACCELS)
def test_a_cold_started_vcpu_is_caught(ram: tuple[mmap.mmap, int], make: type) -> None:
    """The guest's memory alone lets a cold start pass as a continuation (it re-reads where
    it was); its entry count and its register-only secret do not."""
    buf, addr = ram
    a, _ = _walked(ram, make)
    saved = cpu.CpuState.from_json(a.save().to_json())
    secret = saved.regs[guest.SECRET_REG]
    restored = make(addr, SIZE)
    restored.load(saved)
    run(restored, 1)
    chk = guest.verify(memoryview(buf), SIZE, secret=secret)
    assert chk.ok and chk.entries == 1 and chk.secret == secret
    cold = make(addr, SIZE)
    cold.load(cpu.fresh())  # the saved state thrown away
    run(cold, 1)
    chk = guest.verify(memoryview(buf), SIZE, secret=secret)
    assert not chk.ok and "entered 2 times" in chk.problem and chk.secret != secret
    words = np.frombuffer(buf, np.uint64)
    words[(guest.STATE_AT + guest.ENTRIES) // 8] = 1  # a cold start that hides its entry
    chk = guest.verify(memoryview(buf), SIZE, secret=secret)
    assert not chk.ok and "secret changed" in chk.problem


@pytest.mark.parametrize("make", ACCELS)
def test_the_accelerator_says_whether_it_sets_the_guest_tsc(make: type) -> None:
    """The guest's own clock decides: an accelerator whose ``tsc_settable`` claims a set TSC
    must show the guest that TSC; one that does not must leave the guest on the host's TSC
    (TCG; KVM under PVM, which applies no TSC offset) -- never a third clock."""
    seen, accel = tsc.observed(make)
    assert seen == ("restored" if accel.tsc_settable else "host")


def test_the_tsc_probe_is_not_fooled_by_a_young_host() -> None:
    """A host booted minutes ago has a small TSC (2**40 takes 6-8 minutes at 2-3 GHz): the
    guest reading it is the host's clock, not the probe's, whatever its size."""
    young, old = 0xDF804998CC, 0x3_0000_0000_0000  # ~6 minutes and ~3 days at 3 GHz
    assert not kvm.probe_took(young) and not kvm.probe_took(old)
    assert kvm.probe_took(kvm.TSC_PROBE + 5_000_000)


@pytest.mark.parametrize("make", ACCELS)
@pytest.mark.parametrize("start", [guest.HOLE_AT, 0xFEE00000], ids=["hole", "apic"])
def test_a_guest_past_3_gib_walks_across_the_hole(make: type, start: int) -> None:
    """A 4 GiB guest's memory above 3 GiB lies above the PC hole (KVM claims 0xFEE00000 for
    the local APIC whatever the slots say: a flat map stopped the guest there with an MMIO
    exit): one exit's walk from just below ``start`` reaches the file's pages past it."""
    size = (4 << 30) + (32 << 20)
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | NORESERVE)
    guest.layout(memoryview(buf)[: guest.DATA_AT], size)  # the fill only where walked
    words = np.frombuffer(buf, np.uint64)
    first = start - 8 * guest.PAGE
    words[(guest.STATE_AT + guest.CUR) // 8] = first
    a = make(ctypes.addressof(ctypes.c_char.from_buffer(buf)), size)
    a.load(cpu.fresh())
    assert a.run_to_exit() == guest.STEPS_PER_EXIT
    walked = first + guest.PAGE * np.arange(guest.STEPS_PER_EXIT, dtype=np.uint64)
    pages = words.reshape(-1, guest.PAGE // 8)[walked // np.uint64(guest.PAGE)]
    assert (pages[:, 0] == 1).all() and (pages[:, 1] == walked ^ np.uint64(guest.TAG)).all()
    del words, pages
    if isinstance(a, kvm.Kvm):
        a.close()
