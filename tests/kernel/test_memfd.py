"""memfd on an in-process kernel: folio sizes, holes, size rules, punching."""

from __future__ import annotations

import errno

import pytest

from liveupdate.errors import LiveUpdateError
from liveupdate.kernel.fs import memfd
from tests.kernel.conftest import Rig

MiB = 1 << 20


def test_within_size_folios_holes_and_reads(rig: Rig) -> None:
    k = rig.boot("kho=on")
    m = k.new_memfd("a")
    m.truncate(5 * MiB + 4096)
    assert m.nr_pages == 0 and m.pread(10, 100) == bytes(10)  # holes read as zeros
    m.pwrite(b"hello", 4096)  # a fault allocates the aligned 2 MiB block around the page
    assert m.order.tolist() == [9] and m.nr_pages == 512
    m.populate(0, 1281)
    # 2 MiB, 2 MiB, then within i_size only: 1 MiB + 4 KiB in the largest aligned folios
    assert sorted(m.order.tolist(), reverse=True) == [9, 9, 8, 0]
    assert m.pread(5, 4096) == b"hello" and m.pread(3, 5 * MiB + 4094) == bytes(2)
    assert m.pread(10, 5 * MiB + 4096) == b""  # at the end


def test_never_gives_4k_folios(rig: Rig) -> None:
    k = rig.boot("kho=on transparent_hugepage_shmem=never")
    m = k.new_memfd("b")
    m.pwrite(b"x" * 10000, 0)
    assert m.order.tolist() == [0, 0, 0] and m.size == 10000


def test_frozen_size_and_punch(rig: Rig) -> None:
    k = rig.boot("kho=on")
    m = k.new_memfd("c")
    m.pwrite(b"\xff" * (4 * MiB), 0)
    m.fallocate(memfd.FALLOC_FL_PUNCH_HOLE | memfd.FALLOC_FL_KEEP_SIZE, 100, 1 * MiB)
    assert m.pread(4, 96) == b"\xff" * 4 and m.pread(MiB, 100) == bytes(MiB)
    assert m.pread(4, MiB + 100) == b"\xff" * 4 and m.nr_pages == 1024  # zeroed in place
    m.fallocate(memfd.FALLOC_FL_PUNCH_HOLE | memfd.FALLOC_FL_KEEP_SIZE, 2 * MiB, 8 * MiB)
    assert m.size == 4 * MiB and m.pread(2 * MiB, 2 * MiB) == bytes(2 * MiB)
    assert m.nr_pages == 512  # the second 2 MiB folio was wholly inside: freed
    m.frozen = True
    for fn in (lambda: m.truncate(1), lambda: m.pwrite(b"x", 4 * MiB),
               lambda: m.fallocate(0, 0, 4096)):
        with pytest.raises(LiveUpdateError) as e:
            fn()
        assert e.value.errno == errno.EPERM
    m.truncate(4 * MiB)  # the same size is fine
    assert m.pwrite(b"in", 10) == 2


def test_enomem_leaves_the_file_as_it_was(rig: Rig) -> None:
    k = rig.boot("kho=on")
    m = k.new_memfd("d")
    m.pwrite(b"keep", 0)
    held, free_before = m.nr_pages, k.buddy.nr_free
    with pytest.raises(LiveUpdateError) as e:
        m.fallocate(0, 0, 2 << 30)  # more than the 1 GiB machine has
    assert e.value.errno == errno.ENOMEM
    assert m.size == 4 and m.nr_pages == held and k.buddy.nr_free == free_before
    assert memfd.lseek(0, 4, -1, memfd.SEEK_END) == 3
    with pytest.raises(LiveUpdateError):
        memfd.lseek(0, 4, -5, memfd.SEEK_END)


def test_last_reference_frees_the_folios(rig: Rig) -> None:
    k = rig.boot("kho=on")
    free = k.buddy.nr_free
    f = memfd.open_file(k.new_memfd("e"))
    f.get()
    f.private.pwrite(b"x" * (3 * MiB), 0)
    assert k.buddy.nr_free < free
    f.put()
    assert k.buddy.nr_free == free


def test_memfd_create_flags_set_mode_and_seals(rig: Rig) -> None:
    """memfd_alloc_file: MFD_NOEXEC_SEAL clears the x bits and leaves F_SEAL_EXEC (sealable
    without MFD_ALLOW_SEALING); MFD_ALLOW_SEALING alone clears F_SEAL_SEAL; none keeps it."""
    k = rig.boot("kho=on")
    got = {}
    for flags in (0, memfd.MFD_ALLOW_SEALING, memfd.MFD_NOEXEC_SEAL,
                  memfd.MFD_ALLOW_SEALING | memfd.MFD_EXEC):
        m = k.new_memfd("f")
        memfd.init_seals(m, flags)
        got[flags] = (m.mode, m.seals)
    assert got == {0: (0o777, memfd.F_SEAL_SEAL), 2: (0o777, 0),
                   8: (0o666, memfd.F_SEAL_EXEC), 0x12: (0o777, 0)}
    m = k.new_memfd("noexec")
    memfd.init_seals(m, memfd.MFD_NOEXEC_SEAL)
    m.add_seals(memfd.F_SEAL_GROW)  # sealable; F_SEAL_EXEC on 0666 implies nothing
    assert m.seals == memfd.F_SEAL_EXEC | memfd.F_SEAL_GROW


def test_write_seal_on_a_preserved_memfd_is_ebusy(rig: Rig) -> None:
    """memfd_wait_for_pins: LUO pinned every folio at PRESERVE_FD, so F_SEAL_WRITE cannot
    be added (F_SEAL_FUTURE_WRITE and the size seals can); once unpinned it can."""
    k = rig.boot("kho=on")
    m = k.new_memfd("p")
    m.seals = 0
    m.frozen = True
    with pytest.raises(LiveUpdateError) as e:
        m.add_seals(memfd.F_SEAL_WRITE)
    assert e.value.errno == errno.EBUSY and m.seals == 0
    m.add_seals(memfd.F_SEAL_FUTURE_WRITE | memfd.F_SEAL_GROW)
    m.frozen = False
    m.add_seals(memfd.F_SEAL_WRITE)
    assert m.seals == memfd.F_SEAL_WRITE | memfd.F_SEAL_FUTURE_WRITE | memfd.F_SEAL_GROW
