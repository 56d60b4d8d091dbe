"""LUO on in-process kernels (v3 and sessions): what is preserved is exactly what the files
serialized, and no ioctl input changes the state unless it is a valid command."""

from __future__ import annotations

import errno
import struct

from hypothesis import example, given, settings
from hypothesis import strategies as st

from liveupdate.abi import image, kho_memmap, memfd, uapi
from liveupdate.abi.consts import PAGE_SIZE, get_order
from liveupdate.abi.uapi import Gen, State
from liveupdate.errors import LiveUpdateError
from liveupdate.kernel import negotiate
from liveupdate.kernel.fs import memfd as kmemfd
from liveupdate.kernel.kernel import Kernel
from liveupdate.kernel.luo.session import LuoSessions
from liveupdate.kernel.luo.v3 import LuoV3
from tests.kernel.conftest import Rig

V3 = image.KernelImage(release="6.17.0-lu-v3", luo="v3")
CMD = "kho=on liveupdate=on"


def _luo(k: Kernel) -> LuoV3:
    assert k.luo is not None
    return k.luo


def _no_fd(fd: int) -> kmemfd.File:
    raise LiveUpdateError(err=errno.EBADF, msg=f"fd {fd} is not a file")


def _ioctl(k: Kernel, name: str, **fields: int) -> dict[str, int]:
    entry = uapi.ioctl(Gen.V3, name)
    out, _ = _luo(k).ioctl(entry.number, entry.pack(**fields), [], _no_fd)
    return entry.unpack(out.ljust(entry.size, b"\0"))


def test_preserved_map_is_exactly_what_was_serialized(rig: Rig) -> None:
    k = rig.boot(CMD, V3)
    luo = _luo(k)
    files = []
    for token, size in ((1, 6 << 20), (2, 3 * PAGE_SIZE)):
        f = kmemfd.open_file(k.new_memfd(str(token)))
        f.private.truncate(size)
        luo.files.add(token, f)
        files.append(f)
    luo.prepare()
    luo.freeze(negotiate.outgoing(k))
    kout = k.require_kho()
    phys, order = kout.preserved()
    got = set(zip(phys.tolist(), order.tolist(), strict=True))
    want = {(kout.root_phys, 0), (luo.luo_fdt, 0),
            (luo.files_fdt[0], get_order(luo.files_fdt[1]))}
    for e in luo.files:
        m = e.file.private
        want |= set(zip(m.phys.tolist(), m.order.tolist(), strict=True))
        st = memfd.decode_fdt(k.read(e.data, PAGE_SIZE))
        assert (st.folios.pfn << 12).tolist() == m.phys.tolist()  # the FDT names them all
        want.add((e.data, get_order(memfd.fdt_alloc_size(len(m.phys)))))
    assert got == want
    k2 = rig.kexec(k, CMD, V3)
    assert _luo(k2).state is State.UPDATED
    pm = k2.kho_in.preserved if k2.kho_in else None
    assert pm is not None
    assert set(zip(pm.phys.tolist(), pm.order.tolist(), strict=True)) == want
    assert kho_memmap.merged_ranges(pm.phys, pm.order).shape[0] >= 1


def test_unpreserve_after_finalize_is_refused(rig: Rig) -> None:
    """Frozen means frozen: once KHO is finalized (the reboot path), hang-ups of ended
    processes cannot unpreserve anything."""
    k = rig.boot(CMD, V3)
    f = kmemfd.open_file(k.new_memfd("x"))
    f.private.truncate(PAGE_SIZE)
    _luo(k).files.add(9, f)
    _luo(k).prepare()
    k.require_kho().finalize(freeze=True)  # the reboot path's finalize
    try:
        _luo(k).files.remove(9)
    except LiveUpdateError as e:
        assert e.errno == errno.EBUSY
    else:
        raise AssertionError("unpreserve after finalize succeeded")


SET_EVENT = uapi.ioctl(Gen.V3, "SET_EVENT")
UNPRESERVE = uapi.ioctl(Gen.V3, "FD_UNPRESERVE")


@settings(max_examples=300, deadline=None)
@given(nr=st.integers(0, 0xFF), type_=st.sampled_from([0xBA, 0xBB]),
       arg=st.binary(max_size=40))
@example(nr=SET_EVENT.nr, type_=0xBA, arg=SET_EVENT.pack(size=SET_EVENT.size, event=0))
@example(nr=UNPRESERVE.nr, type_=0xBA, arg=UNPRESERVE.pack(size=UNPRESERVE.size, token=1))
def test_garbage_ioctls_change_nothing(nr: int, type_: int, arg: bytes) -> None:
    """v3 dispatcher: a failed ioctl changes nothing; a successful one is a valid command of the
    table and changes exactly what it commands."""
    rig = Rig(256 << 20)
    try:
        k = rig.boot(CMD, V3)
        luo = _luo(k)
        for token in (1, 2):
            luo.files.add(token, kmemfd.open_file(k.new_memfd(f"g{token}")))

        def state() -> tuple[State, list[tuple[int, State]]]:
            return luo.state, [(e.token, e.state) for e in luo.files]

        before = state()
        cmd = (type_ << 8) | nr
        try:
            luo.ioctl(cmd, arg, [], _no_fd)
        except LiveUpdateError as e:
            assert e.errno in (errno.EINVAL, errno.ENOTTY, errno.EFAULT, errno.E2BIG,
                               errno.EBUSY, errno.ENOENT, errno.EBADF, errno.EEXIST)
            assert state() == before
            return
        entry, a = uapi.lookup(Gen.V3, uapi.Target.DEVICE, cmd, arg)  # it was a valid command
        assert state() == _v3_commanded(entry.name, a, before), (entry.name, a)
    finally:
        rig.close()


def _v3_commanded(name: str, a: dict[str, int], before: tuple[State, list[tuple[int, State]]]
                  ) -> tuple[State, list[tuple[int, State]]]:
    """The state a successful v3 command leaves, from the state before it (files 1 and 2,
    NORMAL)."""
    gstate, files = before
    if name == "FD_UNPRESERVE":
        return gstate, [f for f in files if f[0] != a["token"]]
    if name == "SET_EVENT" and a["event"] == uapi.Event.PREPARE:
        return State.PREPARED, [(t, State.PREPARED) for t, _ in files]
    if name == "SET_FD_EVENT" and a["event"] == uapi.Event.PREPARE:
        return gstate, [(t, State.PREPARED if t == a["token"] else s) for t, s in files]
    return before  # queries, and events that are no-ops from NORMAL


def test_ioctl_contract_in_process(rig: Rig) -> None:
    k = rig.boot(CMD, V3)
    f = kmemfd.open_file(k.new_memfd("c"))
    luo = _luo(k)
    fs = uapi.ioctl(Gen.V3, "GET_FD_STATE")
    cases = [
        (uapi.ioctl(Gen.V3, "FD_PRESERVE").number, struct.pack("<IiQ", 15, 0, 1), errno.EINVAL),
        (uapi.ioctl(Gen.V3, "FD_PRESERVE").number, struct.pack("<IiQQ", 24, 0, 1, 5),
         errno.E2BIG),
        (uapi.ioctl(Gen.V3, "FD_PRESERVE").number, struct.pack("<IiQ", 16, 0, 1), errno.EBADF),
        (0xBA07, struct.pack("<II", 8, 0), errno.EINVAL),  # out of the table
        (0xC008BA03, struct.pack("<II", 8, 0), errno.ENOTTY),  # _IOWR-encoded number
        (fs.number, struct.pack("<IB3xQ", 16, 0, 1), errno.ENOENT),
        (fs.number, struct.pack("<IB3xI", 12, 0, 1), errno.EINVAL),  # below offsetofend(token)
        (fs.number, struct.pack("<IB3xQI4x", 24, 0, 1, 0)[:12], errno.EFAULT),
    ]
    for cmd, arg, want in cases:
        try:
            luo.ioctl(cmd, arg, [], _no_fd)
        except LiveUpdateError as e:
            assert e.errno == want, (hex(cmd), e)
        else:
            raise AssertionError(f"{cmd:#x} succeeded")
    out, _ = luo.ioctl(uapi.ioctl(Gen.V3, "FD_PRESERVE").number,
                       struct.pack("<IiQ", 16, 0, 0x42), [3], lambda fd: f)
    assert out == struct.pack("<IiQ", 16, 0, 0x42)
    assert _ioctl(k, "GET_FD_STATE", token=0x42)["state"] == State.NORMAL
    assert _ioctl(k, "SET_FD_EVENT", event=0, token=0x42) is not None  # per-file prepare
    assert _ioctl(k, "GET_FD_STATE", token=0x42)["state"] == State.PREPARED
    assert f.private.frozen
    _ioctl(k, "SET_FD_EVENT", event=3, token=0x42)  # per-file cancel
    assert not f.private.frozen and luo.state is State.NORMAL


class _Sub:
    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[str] = []

    def prepare(self) -> int:
        self.calls.append("prepare")
        return 0x1234

    def freeze(self, data: int) -> int:
        self.calls.append("freeze")
        return data + 1

    def cancel(self, data: int) -> None:
        self.calls.append(f"cancel {data:#x}")

    def finish(self, data: int) -> None:
        self.calls.append(f"finish {data:#x}")


def test_subsystem_api_register_unregister_and_data(rig: Rig) -> None:
    """v3 self-tests subsystem.register_unregister, .double_unregister,
    .register_unregister_many and .getdata_verify."""
    k = rig.boot(CMD, V3)
    subs = _luo(k).subsystems
    many = [_Sub(f"s{i}") for i in range(20)]
    for s in many:
        subs.register(s)
    for s in many[1:]:
        subs.unregister(s)
    for bad, err in ((lambda: subs.register(_Sub("s0")), errno.EEXIST),
                     (lambda: subs.unregister(many[5]), errno.ENOENT),
                     (lambda: subs.get_data("s0"), errno.ENOENT)):
        try:
            bad()
        except LiveUpdateError as e:
            assert e.errno == err
        else:
            raise AssertionError("accepted")
    _luo(k).prepare()
    try:
        subs.register(_Sub("late"))
    except LiveUpdateError as e:
        assert e.errno == errno.EBUSY
    k2 = rig.kexec(k, CMD, V3)
    assert _luo(k2).subsystems.get_data("s0") == 0x1235  # prepared, then frozen (+1)
    assert many[0].calls == ["prepare", "freeze"]
    mine = _Sub("s0")
    _luo(k2).subsystems.register(mine)
    _luo(k2).finish()
    assert mine.calls == ["finish 0x1235"]


S_CMD = "kho=on liveupdate=on"
V6_19 = image.KernelImage(release="6.19.0-lu", luo="6.19")


CREATE = uapi.ioctl(Gen.V6_19, "CREATE_SESSION")


@settings(max_examples=300, deadline=None)
@given(nr=st.integers(0, 0x50), on_session=st.booleans(), arg=st.binary(max_size=80))
@example(nr=CREATE.nr, on_session=False, arg=CREATE.pack(size=CREATE.size, fd=0, name=b"new"))
def test_garbage_session_ioctls_change_nothing(nr: int, on_session: bool, arg: bytes) -> None:
    """6.19 dispatcher: every answer is an errno of the contract and the sessions and their
    files are as they were; a successful ioctl is a valid command of the table and changes
    exactly what it commands (CREATE_SESSION adds its session, nothing else adds anything)."""
    rig = Rig(256 << 20)
    try:
        k = rig.boot(S_CMD, V6_19)
        luo = k.luo
        assert isinstance(luo, LuoSessions)
        dev = luo.open()
        sess = luo.create("s")
        f = kmemfd.open_file(k.new_memfd("g"))
        luo.preserve(sess.private, 1, [3], lambda fd: f)

        def state() -> dict[str, list[int]]:
            return {n: sorted(s.files.files) for n, s in luo.outgoing.items()
                    if s.files is not None}

        before = state()
        target = sess if on_session else dev
        try:
            target.ops.ioctl(target, 0xBA00 | nr, arg, [], _no_fd)  # type: ignore[attr-defined]
        except LiveUpdateError as e:
            assert e.errno in (errno.EINVAL, errno.ENOTTY, errno.EFAULT, errno.E2BIG,
                               errno.ENOENT, errno.EBADF, errno.EEXIST, errno.ENOSPC)
            assert state() == before
            return
        where = uapi.Target.SESSION if on_session else uapi.Target.DEVICE
        entry, a = uapi.lookup(Gen.V6_19, where, 0xBA00 | nr, arg)  # a valid command
        want = dict(before)
        if entry.name == "CREATE_SESSION":
            want[uapi.session_name(a["name"], strict=False)] = []
        assert state() == want, (entry.name, a)
    finally:
        rig.close()
