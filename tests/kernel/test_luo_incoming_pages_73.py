"""When the previous kernel's LUO and KHO pages go back, 7.3.4 against 7.2 (as modelled):
7.3 frees luo_ser at boot (luo_early_startup), the session chain at the first open
(luo_session_deserialize), a session's file chain at its FINISH (luo_file_finish) and never
the FLB header (luo_flb_setup_incoming) or kexec-metadata (kho_in_kexec_metadata); 7.2 frees
every LUO page at the first open and kexec-metadata at boot. A page kept is not preserved
again, so a chain of updates holds no more of them than one."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from liveupdate.abi import kho_block, luo_ser, luo_session
from liveupdate.abi.consts import PAGE_SHIFT
from liveupdate.abi.image import KernelImage
from liveupdate.kernel.fs import memfd as kmemfd
from liveupdate.kernel.kernel import Kernel
from liveupdate.kernel.kho.incoming import NOT_PRESERVED
from liveupdate.scenario.generations import ioctl
from tests.kernel.conftest import Rig

LINE = "kho=on liveupdate=on"


@dataclass
class Pages:
    luo_ser: int
    sessions: list[int]
    files: dict[str, list[int]]  # session name -> its file chain
    flb: int
    kexec_md: int


def _preserve(k: Kernel, names: tuple[str, ...]) -> None:
    assert k.luo is not None
    dev = k.luo.open()
    for token, name in enumerate(names, 1):
        _, (s,) = ioctl(k, dev, "CREATE_SESSION", fd=0, name=name.encode())
        m = k.new_memfd(name)
        m.truncate(4096)
        m.pwrite(name.encode(), 0)
        ioctl(k, s, "SESSION_PRESERVE_FD", [kmemfd.open_file(m)], fd=3, token=token)


def _pages(k: Kernel) -> Pages:
    """The handover's pages, read from the RAM the old kernel left at the jump."""
    subtrees = dict(k.require_kho().subtrees())
    ser = luo_ser.decode(k.read(subtrees["LUO"], luo_ser.LUO_SER.size))
    rows, sessions = luo_ser.session_rows(k.mem, ser.sessions_pa)
    files = {}
    for row in rows:
        name = bytes(row["name"]).rstrip(b"\0").decode()
        files[name] = kho_block.decode(k.mem, int(row["files"]),
                                       luo_session.FILE_DTYPE.itemsize, name)[1]
    return Pages(subtrees["LUO"], sessions, files, ser.flbs_pa, subtrees["kexec-metadata"])


def _held(k: Kernel, *phys: int) -> list[bool]:
    """Whether each page is still a preserved page nobody took back."""
    assert k.kho_in is not None
    pfn = np.array([p >> PAGE_SHIFT for p in phys], np.int64)
    return [o != NOT_PRESERVED for o in k.kho_in.preserved_orders(pfn).tolist()]


@contextlib.contextmanager
def _updated(gen: str) -> Iterator[tuple[Kernel, Pages]]:
    """A ``gen`` kernel booted from one that preserved a memfd in each of "a" and "b"."""
    rig, img = Rig(), KernelImage.of(gen)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            k = rig.boot(LINE, img)
            _preserve(k, ("a", "b"))
            loaded = rig.jump(k, LINE, img)
            pages = _pages(k)
            k.ram.close()
            yield rig.start(loaded.boot_params), pages
    finally:
        rig.close()


def test_7_3_frees_each_incoming_page_when_7_3_4_does() -> None:
    with _updated("7.3") as (k, p):
        assert k.luo is not None
        kept = (p.flb, p.kexec_md)
        assert _held(k, p.luo_ser) == [False]  # luo_early_startup
        assert all(_held(k, *p.sessions, *p.files["a"], *p.files["b"], *kept))
        _, (a,) = ioctl(k, k.luo.open(), "RETRIEVE_SESSION", fd=0, name=b"a")
        assert not any(_held(k, *p.sessions))  # luo_session_deserialize
        assert all(_held(k, *p.files["a"], *p.files["b"], *kept))
        ioctl(k, a, "SESSION_RETRIEVE_FD", fd=0, token=1)
        assert all(_held(k, *p.files["a"]))  # retrieving is not finishing
        ioctl(k, a, "SESSION_FINISH")
        assert not any(_held(k, *p.files["a"]))  # luo_file_finish
        assert all(_held(k, *p.files["b"], *kept))  # "b" never retrieved; FLB, metadata: never


def test_7_3_frees_a_file_chain_at_the_implicit_finish_of_a_close() -> None:
    with _updated("7.3") as (k, p):
        assert k.luo is not None
        _, (b,) = ioctl(k, k.luo.open(), "RETRIEVE_SESSION", fd=0, name=b"b")
        assert all(_held(k, *p.files["b"]))
        k.luo.close(b.private)  # luo_session_release
        assert not any(_held(k, *p.files["b"]))


def test_7_2_frees_every_luo_page_at_the_first_open_and_kexec_metadata_at_boot() -> None:
    with _updated("7.2") as (k, p):
        assert k.luo is not None
        luo = [p.luo_ser, *p.sessions, *p.files["a"], *p.files["b"], p.flb]
        assert _held(k, p.kexec_md) == [False]
        assert all(_held(k, *luo))
        k.luo.open()
        assert not any(_held(k, *luo))


@pytest.mark.parametrize("gen", ["7.2", "7.3"])
def test_pages_a_kernel_keeps_do_not_add_up_over_updates(gen: str) -> None:
    """Each kernel retrieves and finishes "a", leaves "b" alone and preserves both anew: the
    free pages after that are the same in every updated kernel."""
    rig, img = Rig(), KernelImage.of(gen)
    free: list[int] = []
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            k = rig.boot(LINE, img)
            _preserve(k, ("a", "b"))
            for _ in range(4):
                k = rig.kexec(k, LINE, img)
                assert k.luo is not None
                dev = k.luo.open()
                _, (a,) = ioctl(k, dev, "RETRIEVE_SESSION", fd=0, name=b"a")
                ioctl(k, a, "SESSION_FINISH")
                k.luo.close(a.private)
                k.luo.device_open = False  # as if /dev/liveupdate were closed
                free.append(k.buddy.nr_free)
                _preserve(k, ("a", "b"))
    finally:
        rig.close()
    assert len(set(free)) == 1, free
