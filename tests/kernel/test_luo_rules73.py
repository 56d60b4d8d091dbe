"""Generation 7.3's own sessions behaviour (kernel/luo/rules.py ``Rules73``, read in Linux
7.3.4), on in-process kernels through the ioctl dispatchers with raw uAPI structs -- each case
beside 7.2's answer where the two differ."""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterator

import pytest

from liveupdate.abi import image, uapi
from liveupdate.abi.consts import PAGE_SIZE
from liveupdate.abi.uapi import Gen
from liveupdate.errors import LiveUpdateError
from liveupdate.kernel.fs import memfd as kmemfd
from liveupdate.kernel.fs.file import File
from liveupdate.kernel.kernel import Kernel
from liveupdate.kernel.luo.session import LuoSessions
from tests.kernel.conftest import Rig

CMD = "kho=on liveupdate=on"
IMG = {g: image.KernelImage.of(g) for g in ("7.2", "7.3")}
UINT_MAX = (1 << 32) - 1


@pytest.fixture
def small() -> Iterator[Rig]:
    r = Rig(256 << 20)
    yield r
    r.close()


def _luo(k: Kernel) -> LuoSessions:
    assert isinstance(k.luo, LuoSessions)
    return k.luo


def _no_fd(fd: int) -> File:
    raise LiveUpdateError(err=errno.EBADF, msg=f"fd {fd} is not a file")


def call(target: File, cmd: int | str, arg: bytes, resolve: File | None = None) -> object:
    """One ioctl: the reply's decoded struct and new files, or the errno name."""
    entry = None if isinstance(cmd, int) else uapi.ioctl(Gen.V7_1, cmd)
    number = cmd if isinstance(cmd, int) else entry.number  # type: ignore[union-attr]
    try:
        _, files = target.ops.ioctl(  # type: ignore[attr-defined]
            target, number, arg, [3] if resolve else [],
            (lambda fd: resolve) if resolve else _no_fd)
    except LiveUpdateError as e:
        return errno.errorcode[e.errno]
    return files[0] if files else "ok"


def pack(op: str, /, **fields: object) -> bytes:
    """``op``'s struct, ``size`` its own unless given."""
    entry = uapi.ioctl(Gen.V7_1, op)
    return entry.pack(**{"size": entry.size, **fields})


def with_session(rig: Rig, gen: str, name: bytes, data: bytes = b"",
                 ) -> tuple[Kernel, File]:
    """Boot ``gen``, preserve a session ``name`` (with a one-page memfd holding ``data`` as
    token 1 when given), kexec into ``gen`` again and open /dev/liveupdate there."""
    k = rig.boot(CMD, IMG[gen])
    dev = _luo(k).open()
    s = call(dev, "CREATE_SESSION", pack("CREATE_SESSION", name=name))
    assert isinstance(s, File), s
    if data:
        m = k.new_memfd("data")
        m.truncate(PAGE_SIZE)
        m.pwrite(data, 0)
        f = kmemfd.open_file(m)
        assert call(s, "SESSION_PRESERVE_FD", pack("SESSION_PRESERVE_FD", token=1), f) == "ok"
    k2 = rig.kexec(k, CMD, IMG[gen])
    return k2, _luo(k2).open()


@pytest.mark.parametrize("gen, want", [("7.3", "EINVAL"), ("7.2", "created")])
def test_create_session_refuses_empty_and_unterminated_names(small: Rig, gen: str,
                                                             want: str) -> None:
    """``luo_session_create`` (7.3.4 kernel/liveupdate/luo_session.c): ``strnlen`` of 0 or of
    the whole 64-byte field is EINVAL; 7.2 takes both (an empty name, a 63-byte truncation)."""
    k = small.boot(CMD, IMG[gen])
    dev = _luo(k).open()
    got = [call(dev, "CREATE_SESSION", pack("CREATE_SESSION", name=n))
           for n in (b"", b"X" * 64)]
    assert [g if isinstance(g, str) else "created" for g in got] == [want, want]
    assert sorted(_luo(k).outgoing) == ([] if want == "EINVAL" else ["", "X" * 63])
    ok = call(dev, "CREATE_SESSION", pack("CREATE_SESSION", name=b"A" * 63))
    assert isinstance(ok, File) and "A" * 63 in _luo(k).outgoing  # 63 bytes + NUL: fine


@pytest.mark.parametrize("gen, want", [("7.3", "ENOENT"), ("7.2", "retrieved")])
def test_retrieve_session_compares_all_64_bytes(small: Rig, gen: str, want: str) -> None:
    """``luo_session_retrieve``: ``strncmp(it->name, name, 64)`` -- a field without a NUL
    matches no session; 7.2 truncates it to 63 bytes and finds ``A``*63."""
    _, dev = with_session(small, gen, b"A" * 63)
    got = call(dev, "RETRIEVE_SESSION", pack("RETRIEVE_SESSION", name=b"A" * 64))
    assert (got if isinstance(got, str) else "retrieved") == want
    if want == "ENOENT":
        s = call(dev, "RETRIEVE_SESSION", pack("RETRIEVE_SESSION", name=b"A" * 63))
        assert isinstance(s, File)  # the terminated name still finds it


@pytest.mark.parametrize("gen, want", [("7.3", "EINVAL"), ("7.2", "ok")])
def test_finish_checks_reserved(small: Rig, gen: str, want: str) -> None:
    """``luo_session_finish``: ``reserved`` != 0 is EINVAL before anything is finished."""
    _, dev = with_session(small, gen, b"s", b"data")
    s = call(dev, "RETRIEVE_SESSION", pack("RETRIEVE_SESSION", name=b"s"))
    assert isinstance(s, File)
    assert call(s, "SESSION_FINISH", pack("SESSION_FINISH", reserved=1)) == want
    # refused: nothing finished, the file is still there to retrieve; 7.2 finished it
    got = call(s, "SESSION_RETRIEVE_FD", pack("SESSION_RETRIEVE_FD", token=1))
    if want == "EINVAL":
        assert isinstance(got, File) and got.private.pread(4, 0) == b"data"
    else:
        assert got == "ENOENT"
    assert call(s, "SESSION_FINISH", pack("SESSION_FINISH")) == "ok"


def test_direction_is_checked_before_the_size_rules(small: Rig) -> None:
    """``luo_session_ioctl``: ``luo_ioctl_type_valid`` comes before ``min_size`` and
    ``copy_struct_from_user``: FINISH on an outgoing session and PRESERVE_FD on an incoming
    one with a long, non-zero tail are EINVAL on 7.3 and E2BIG on 7.2."""
    got = {}
    for gen in ("7.3", "7.2"):
        k = small.boot(CMD, IMG[gen])
        dev = _luo(k).open()
        out = call(dev, "CREATE_SESSION", pack("CREATE_SESSION", name=b"out"))
        assert isinstance(out, File)
        long_finish = struct.pack("<II", 16, 0) + b"\1" * 8
        got[gen] = [call(out, "SESSION_FINISH", long_finish)]
        k2 = small.kexec(k, CMD, IMG[gen])
        s = call(_luo(k2).open(), "RETRIEVE_SESSION", pack("RETRIEVE_SESSION", name=b"out"))
        assert isinstance(s, File)
        long_preserve = struct.pack("<IiQ", 24, 3, 1) + b"\1" * 8
        got[gen].append(call(s, "SESSION_PRESERVE_FD", long_preserve))
        got[gen].append(call(s, "SESSION_FINISH", struct.pack("<I", 2)))  # short: both EINVAL
    assert got == {"7.3": ["EINVAL", "EINVAL", "EINVAL"], "7.2": ["E2BIG", "E2BIG", "EINVAL"]}


@pytest.mark.parametrize("gen", ["7.3", "7.2"])
def test_unknown_ioctl_numbers(small: Rig, gen: str) -> None:
    """``luo_ioctl`` / ``luo_session_ioctl``: a number outside the ops table is EINVAL (the
    uAPI header's comment says ENOTTY; the code answers EINVAL), a number in range whose type
    or direction bits are not the table's is ENOIOCTLCMD (ENOTTY). Both generations agree."""
    k = small.boot(CMD, IMG[gen])
    dev = _luo(k).open()
    s = call(dev, "CREATE_SESSION", pack("CREATE_SESSION", name=b"s"))
    assert isinstance(s, File)
    arg = struct.pack("<I", 8) + bytes(76)
    assert [call(dev, 0xBA00 | nr, arg) for nr in (0x02, 0x40, 0xFF)] == ["EINVAL"] * 3
    assert [call(s, 0xBA00 | nr, arg) for nr in (0x00, 0x3F, 0x44)] == ["EINVAL"] * 3
    assert call(dev, 0xBB00, arg) == "ENOTTY" and call(s, 0xBB40, arg) == "ENOTTY"


@pytest.mark.parametrize("gen, want", [("7.3", "EFBIG"), ("7.2", "E2BIG")])
def test_memfd_over_uint_max_pages(small: Rig, gen: str, want: str) -> None:
    """``memfd_luo_preserve``: ``DIV_ROUND_UP_ULL(size, PAGE_SIZE) > UINT_MAX`` is EFBIG
    (7.3.4 mm/memfd_luo.c); nothing is allocated for the sparse file."""
    k = small.boot(CMD, IMG[gen])
    dev = _luo(k).open()
    s = call(dev, "CREATE_SESSION", pack("CREATE_SESSION", name=b"big"))
    assert isinstance(s, File)
    m = k.new_memfd("big")
    m.truncate(UINT_MAX * PAGE_SIZE + 1)
    f = kmemfd.open_file(m)
    assert call(s, "SESSION_PRESERVE_FD", pack("SESSION_PRESERVE_FD", token=1), f) == want
    assert m.nr_pages == 0 and not m.frozen and len(_luo(k).outgoing["big"].files or []) == 0


@pytest.mark.parametrize("gen", ["7.3", "7.2"])
def test_seal_exec_on_an_executable_memfd_implies_the_write_seals(small: Rig, gen: str) -> None:
    """``memfd_add_seals`` (mm/memfd.c): F_SEAL_EXEC on a mode-0777 memfd adds
    SHRINK|GROW|WRITE|FUTURE_WRITE -- memfd core, the same on every generation; on a memfd
    without execute bits (MFD_NOEXEC_SEAL's 0666) F_SEAL_EXEC stays alone."""
    k = small.boot(CMD, IMG[gen])
    m = k.new_memfd("x")
    m.seals = 0  # MFD_ALLOW_SEALING
    m.add_seals(kmemfd.F_SEAL_EXEC)
    assert m.seals == 0x3E
    with pytest.raises(LiveUpdateError) as e:
        m.pwrite(b"w", 0)
    assert e.value.errno == errno.EPERM
    n = k.new_memfd("noexec")
    n.seals, n.mode = 0, 0o666
    n.add_seals(kmemfd.F_SEAL_EXEC)
    assert n.seals == kmemfd.F_SEAL_EXEC


@pytest.mark.parametrize("gen, want", [("7.3", 0x3E), ("7.2", 0x20)])
def test_retrieved_memfd_gets_the_seal_exec_implication(small: Rig, gen: str,
                                                       want: int) -> None:
    """``memfd_luo_retrieve`` (7.3.4 mm/memfd_luo.c) adds the preserved seals with
    ``memfd_add_seals`` to a new 0777 memfd: a memfd preserved with F_SEAL_EXEC alone (made
    0666 by MFD_NOEXEC_SEAL) comes back write-sealed; 7.2 restores the seal word as it is."""
    k = small.boot(CMD, IMG[gen])
    dev = _luo(k).open()
    s = call(dev, "CREATE_SESSION", pack("CREATE_SESSION", name=b"noexec"))
    assert isinstance(s, File)
    m = k.new_memfd("noexec")
    m.seals, m.mode = 0, 0o666
    m.truncate(PAGE_SIZE)
    m.pwrite(b"kept", 0)
    m.add_seals(kmemfd.F_SEAL_EXEC)
    f = kmemfd.open_file(m)
    assert call(s, "SESSION_PRESERVE_FD", pack("SESSION_PRESERVE_FD", token=7), f) == "ok"
    k2 = small.kexec(k, CMD, IMG[gen])
    s2 = call(_luo(k2).open(), "RETRIEVE_SESSION", pack("RETRIEVE_SESSION", name=b"noexec"))
    assert isinstance(s2, File)
    got = call(s2, "SESSION_RETRIEVE_FD", pack("SESSION_RETRIEVE_FD", token=7))
    assert isinstance(got, File)
    assert got.private.seals == want and got.private.pread(4, 0) == b"kept"
