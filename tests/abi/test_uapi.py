import errno
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from liveupdate.abi import luo_session, uapi
from liveupdate.abi.uapi import Gen, Target
from liveupdate.errors import AbiError


def test_mainline_numbers_and_sizes() -> None:
    got = {i.name: (i.number, i.size) for i in uapi.TABLES[Gen.V7_1]}
    assert got == {
        "CREATE_SESSION": (0xBA00, 72), "RETRIEVE_SESSION": (0xBA01, 72),
        "SESSION_PRESERVE_FD": (0xBA40, 16), "SESSION_RETRIEVE_FD": (0xBA41, 16),
        "SESSION_FINISH": (0xBA42, 8), "SESSION_GET_NAME": (0xBA43, 72),
    }
    assert "SESSION_GET_NAME" not in {i.name for i in uapi.TABLES[Gen.V6_19]}


def test_state_machine_generations() -> None:
    v3 = {i.name: (i.number, i.size) for i in uapi.TABLES[Gen.V3]}
    assert v3["FD_PRESERVE"] == (0xBA00, 16) and v3["SET_EVENT"] == (0xBA04, 8)
    assert v3["GET_FD_STATE"] == (0xBA05, 24) and v3["SET_FD_EVENT"] == (0xBA06, 16)
    v4 = {i.name: (i.number, i.size) for i in uapi.TABLES[Gen.V4]}
    assert v4["CREATE_SESSION"] == (0xBA02, 64) and v4["RETRIEVE_SESSION"] == (0xBA03, 72)
    assert v4["SESSION_GET_STATE"] == (0xBA43, 12)


def test_pack_unpack() -> None:
    io = uapi.ioctl(Gen.V6_19, "CREATE_SESSION")
    raw = io.pack(fd=-1, name="vm1")
    assert raw == struct.pack("<Ii64s", 72, -1, b"vm1")
    assert io.unpack(raw)["name"].rstrip(b"\0") == b"vm1"
    fs = uapi.ioctl(Gen.V3, "GET_FD_STATE")
    raw = fs.pack(incoming=1, token=0x1A, state=2)
    assert raw == struct.pack("<IB3xQI4x", 24, 1, 0x1A, 2)
    with pytest.raises(AbiError, match="padding"):
        fs.unpack(raw[:5] + b"\x01" + raw[6:])


@given(st.binary(max_size=100), st.integers(1, 80), st.integers(1, 80))
def test_copy_struct_from_user_rules(user: bytes, ksize: int, min_size: int) -> None:
    min_size = min(min_size, ksize)
    try:
        out = uapi.copy_struct_from_user(ksize, min_size, user)
    except AbiError as e:
        if len(user) < min_size:
            assert e.errno == errno.EINVAL
        else:
            assert e.errno == errno.E2BIG and any(user[ksize:])
        return
    assert len(out) == ksize and out[: len(user)] == user[:ksize]
    assert len(user) >= min_size and not any(user[ksize:])


def _errno(gen: Gen, target: Target, cmd: int, arg: bytes) -> int:
    with pytest.raises(AbiError) as e:
        uapi.lookup(gen, target, cmd, arg)
    return e.value.errno


def test_dispatcher_order() -> None:
    create = uapi.ioctl(Gen.V6_19, "CREATE_SESSION").pack(name="x")
    assert uapi.lookup(Gen.V6_19, Target.DEVICE, 0xBA00, create)[0].name == "CREATE_SESSION"
    # out of the table: EINVAL, not ENOTTY -- also session ioctls on the device
    assert _errno(Gen.V6_19, Target.DEVICE, 0xBA02, create) == errno.EINVAL
    assert _errno(Gen.V6_19, Target.DEVICE, 0xBA40, create) == errno.EINVAL
    assert _errno(Gen.V6_19, Target.SESSION, 0xBA43, bytes(72)) == errno.EINVAL
    # in range but not the exact number (other type byte, _IOWR encoding): ENOTTY
    assert _errno(Gen.V6_19, Target.DEVICE, 0xBB00, create) == errno.ENOTTY
    assert _errno(Gen.V6_19, Target.DEVICE, 0xC048BA00, create) == errno.ENOTTY
    # size rules
    short = struct.pack("<I", 8) + bytes(68)
    assert _errno(Gen.V6_19, Target.DEVICE, 0xBA00, short) == errno.EINVAL
    long = struct.pack("<I", 80) + create[4:] + b"\x01" + bytes(7)
    assert _errno(Gen.V6_19, Target.DEVICE, 0xBA00, long) == errno.E2BIG
    ok = struct.pack("<I", 80) + create[4:] + bytes(8)
    assert uapi.lookup(Gen.V6_19, Target.DEVICE, 0xBA00, ok)[1]["size"] == 80
    assert _errno(Gen.V6_19, Target.DEVICE, 0xBA00, b"\x01") == errno.EFAULT
    name = uapi.ioctl(Gen.V7_1, "SESSION_GET_NAME").pack()
    assert uapi.lookup(Gen.V7_1, Target.SESSION, 0xBA43, name)[0].name == "SESSION_GET_NAME"


def test_session_names() -> None:
    assert uapi.session_name(b"vm1\0junk", strict=True) == "vm1"
    assert uapi.session_name(b"A" * 64, strict=False) == "A" * 63
    with pytest.raises(AbiError, match="NUL-terminated"):
        uapi.session_name(b"A" * 64, strict=True)
    with pytest.raises(AbiError, match="empty"):
        uapi.session_name(bytes(64), strict=True)
    # names are bytes to Linux: any byte but NUL comes back as it went in
    raw = b"\xff\xfe-raw"
    name = uapi.session_name(raw + b"\0", strict=True)
    assert name.encode("utf-8", uapi.NAME_ERRORS) == raw
    assert luo_session.name_field(name, 64, "session name") == raw


def test_v3_get_fd_state_accepts_offsetofend_token() -> None:
    """v3's table entry is offsetofend(struct liveupdate_ioctl_get_fd_state, token) = 16: a
    16-byte argument is zero-extended; 15 bytes is EINVAL."""
    entry = uapi.ioctl(uapi.Gen.V3, "GET_FD_STATE")
    assert (entry.min_size, entry.size) == (16, 24)
    arg = struct.pack("<IB3xQ", 16, 1, 0xABC)
    got, fields = uapi.lookup(uapi.Gen.V3, uapi.Target.DEVICE, entry.number, arg)
    assert got is entry and fields == {"size": 16, "incoming": 1, "token": 0xABC, "state": 0}
    with pytest.raises(AbiError) as e:
        uapi.lookup(uapi.Gen.V3, uapi.Target.DEVICE, entry.number, struct.pack("<I11x", 15))
    assert e.value.errno == errno.EINVAL
