"""What an incoming luo-v5 handover may hold, 7.3.4 against 7.2 (as modelled): 7.3 reads the
session chain at boot and the entries at the first open (luo_session_deserialize), where a
duplicate name is EIO on every open and duplicate tokens are kept; 7.2 reads everything at
boot and panics. The handover is edited in RAM after the reboot path wrote it."""

from __future__ import annotations

import contextlib
import errno
import io
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from liveupdate.abi import kho_block, luo_ser, luo_session
from liveupdate.abi import memfd as memfd_abi
from liveupdate.abi.image import KernelImage
from liveupdate.errors import LiveUpdateError
from liveupdate.kernel.fs import memfd as kmemfd
from liveupdate.kernel.kernel import Kernel
from liveupdate.kernel.power import Halted
from liveupdate.scenario.generations import ioctl
from tests.kernel.conftest import Rig

Edit = Callable[[Kernel, int], None]  # the old kernel, its luo_ser's sessions_pa


def _entries(first: int) -> int:
    """Where the entries of a chain's first block start."""
    return first + kho_block.HEADER.itemsize


def _sessions_pa(k: Kernel) -> int:
    luo = dict(k.require_kho().subtrees())["LUO"]
    return luo_ser.decode(k.read(luo, luo_ser.LUO_SER.size)).sessions_pa


def _rename_second_session_as_first(k: Kernel, pa: int) -> None:
    at = _entries(pa)
    k.write(at + luo_session.SESSION_DTYPE.itemsize, b"s0".ljust(64, b"\0"))


def _second_token_as_first(k: Kernel, pa: int) -> None:
    at = _entries(pa)
    files = int(np.frombuffer(k.read(at, luo_session.SESSION_DTYPE.itemsize),
                              luo_session.SESSION_DTYPE)[0]["files"])
    f0 = _entries(files)
    off = luo_session.FILE_DTYPE.fields["token"][1]
    k.write(f0 + luo_session.FILE_DTYPE.itemsize + off, (1).to_bytes(8, "little"))


@contextlib.contextmanager
def _updated(gen: str, edit: Edit) -> Iterator[Kernel]:
    """A kernel of ``gen`` booted from a handover of two sessions ("s0": memfds of tokens 1
    and 2 holding b"one", b"two"; "s1": none), ``edit``-ed at the jump."""
    rig, img, line = Rig(), KernelImage.of(gen), "kho=on liveupdate=on"
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            k = rig.boot(line, img)
            assert k.luo is not None
            dev = k.luo.open()
            _, (s0,) = ioctl(k, dev, "CREATE_SESSION", fd=0, name=b"s0")
            ioctl(k, dev, "CREATE_SESSION", fd=0, name=b"s1")
            for token, data in ((1, b"one"), (2, b"two")):
                m = k.new_memfd(f"m{token}")
                m.truncate(4096)
                m.pwrite(data, 0)
                ioctl(k, s0, "SESSION_PRESERVE_FD", [kmemfd.open_file(m)], fd=3, token=token)
            loaded = rig.jump(k, line, img)
            edit(k, _sessions_pa(k))
            k.ram.close()
            yield rig.start(loaded.boot_params)
    finally:
        rig.close()


def test_7_3_answers_eio_for_a_duplicate_incoming_session_name() -> None:
    with _updated("7.3", _rename_second_session_as_first) as k:
        assert k.luo is not None
        for _ in range(2):  # luo_session_deserialize's saved_err: every open
            with pytest.raises(LiveUpdateError) as e:
                k.luo.open()
            assert e.value.errno == errno.EIO


def test_7_3_keeps_duplicate_incoming_tokens_and_retrieves_the_first() -> None:
    with _updated("7.3", _second_token_as_first) as k:
        assert k.luo is not None
        _, (s0,) = ioctl(k, k.luo.open(), "RETRIEVE_SESSION", fd=0, name=b"s0")
        _, (f,) = ioctl(k, s0, "SESSION_RETRIEVE_FD", fd=0, token=1)
        assert bytes(f.private.pread(3, 0)) == b"one"


@pytest.mark.parametrize("edit", [_rename_second_session_as_first, _second_token_as_first])
def test_7_2_panics_at_boot_on_either(edit: Edit) -> None:
    with pytest.raises(Halted, match="duplicate"), _updated("7.2", edit):
        pass


def _lose_first_folio_array(k: Kernel, pa: int) -> None:
    """The first memfd's ``folios`` kho_vmalloc points at a page nobody preserved."""
    at = _entries(pa)
    files = int(np.frombuffer(k.read(at, luo_session.SESSION_DTYPE.itemsize),
                              luo_session.SESSION_DTYPE)[0]["files"])
    entry = np.frombuffer(k.read(_entries(files), luo_session.FILE_DTYPE.itemsize),
                          luo_session.FILE_DTYPE)[0]
    k.write(int(entry["data"]) + memfd_abi.SER_V2.size, (0x1000).to_bytes(8, "little"))


@pytest.mark.parametrize("gen, err", [("7.3", errno.EINVAL), ("7.2", errno.EIO)])
def test_a_memfd_whose_folio_array_is_lost(gen: str, err: int) -> None:
    """memfd_luo_retrieve: kho_restore_vmalloc refusing the folio array is EINVAL on 7.3.4;
    the other memfd of the session is still retrieved."""
    with _updated(gen, _lose_first_folio_array) as k:
        assert k.luo is not None
        _, (s0,) = ioctl(k, k.luo.open(), "RETRIEVE_SESSION", fd=0, name=b"s0")
        with pytest.raises(LiveUpdateError) as e:
            ioctl(k, s0, "SESSION_RETRIEVE_FD", fd=0, token=1)
        assert e.value.errno == err
        _, (f,) = ioctl(k, s0, "SESSION_RETRIEVE_FD", fd=0, token=2)
        assert bytes(f.private.pread(3, 0)) == b"two"
