"""The syscall transport's sender credentials (kernel/syscalls/creds.py), without a machine:
the host kernel names the sender of each record, and its uid and capabilities are read at
the call, not at connect time."""

from __future__ import annotations

import array
import errno
import os
import socket

import pytest

from liveupdate.errors import LiveUpdateError
from liveupdate.kernel.syscalls import creds

MAX_FDS = 253


def _has_passpidfd() -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        try:
            s.setsockopt(socket.SOL_SOCKET, creds.SO_PASSPIDFD, 1)
        except OSError:
            return False  # Linux < 6.5: the pid alone
    return True


def _child(kside: socket.socket, uside: socket.socket, steps: list[str]) -> int:
    """A process that sends one record per step: "send", "drop" (to uid 65534, then send),
    "fds" (MAX_FDS fds beside the record, the most one call may pass); it waits for a byte
    before each step."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            kside.close()  # the parent's end is the parent's: its close is our EOF
            for step in steps:
                if not uside.recv(1):
                    break  # the test ended early
                if step == "drop":
                    os.setgid(65534)
                    os.setuid(65534)
                fds = [0] * MAX_FDS if step == "fds" else []
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                        array.array("i", fds).tobytes())] if fds else []
                uside.sendmsg([step.encode()], anc)
            uside.recv(1)
        finally:
            os._exit(0)
    return pid


def _next(kside: socket.socket) -> tuple[bytes, list[int], int, creds.Peer]:
    kside.send(b"g")
    return creds.recvmsg(kside, 1 << 16, MAX_FDS)


@pytest.mark.skipif(os.geteuid() != 0, reason="changing uid needs root")
def test_the_sender_is_named_and_judged_at_each_record() -> None:
    kside, uside = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    creds.enable(kside)  # before the peer sends anything, as Userspace.spawn does
    pid = _child(kside, uside, ["send", "fds", "drop"])
    uside.close()
    try:
        raw, fds, flags, peer = _next(kside)
        assert raw == b"send" and peer.pid == pid
        root = peer.cred()
        assert root.fsuid == 0 and root.capable(creds.CAP_SYS_BOOT)
        creds.require_sys_boot(root, "kexec_file_load")
        creds.may_open_root_node(root, "/dev/liveupdate", write=True)
        peer.close()
        # the host puts the pidfd after the fds: the control buffer has room for the
        # credentials, MAX_FDS fds and the pidfd, so a full call is not truncated
        # (server._dropped_fds would call that EMFILE) and its sender is still named
        raw, fds, flags, peer = _next(kside)
        assert raw == b"fds" and len(fds) == MAX_FDS and not flags & socket.MSG_CTRUNC
        assert peer.pid == pid and (peer.pidfd is not None or not _has_passpidfd())
        for fd in fds:
            os.close(fd)
        peer.close()
        raw, fds, flags, peer = _next(kside)  # the same connection, after setuid(65534)
        assert raw == b"drop" and peer.pid == pid
        nobody = peer.cred()
        assert (nobody.uid, nobody.euid, nobody.fsuid, nobody.cap_eff) == (65534,) * 3 + (0,)
        with pytest.raises(LiveUpdateError) as e:
            creds.require_sys_boot(nobody, "kexec_file_load")
        assert e.value.errno == errno.EPERM
        with pytest.raises(LiveUpdateError) as e:
            creds.may_open_root_node(nobody, "/dev/liveupdate", write=True)
        assert e.value.errno == errno.EACCES
        peer.close()
    finally:
        kside.close()  # the child sees the end and exits, whatever step it is at
        os.waitpid(pid, 0)


def test_a_record_without_a_named_sender_is_refused() -> None:
    """No SO_PASSCRED on the kernel's end: no credentials, so nothing privileged."""
    kside, uside = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with kside, uside:
        uside.send(b"x")
        _raw, _fds, _flags, peer = creds.recvmsg(kside, 100, MAX_FDS)
        assert peer.pid is None
        with pytest.raises(LiveUpdateError) as e:
            peer.cred()
        assert e.value.errno == errno.EPERM


def test_status_parsing_reads_fsuid_and_effective_caps() -> None:
    text = ("Name:\tx\nUid:\t1000\t0\t0\t0\nGid:\t0\t0\t0\t0\n"
            "CapPrm:\t000001ffffffffff\nCapEff:\t0000000000400000\n")
    c = creds.parse_status(7, text)
    assert (c.uid, c.euid, c.fsuid) == (1000, 0, 0)
    assert c.capable(creds.CAP_SYS_BOOT) and not c.capable(creds.CAP_DAC_OVERRIDE)
    with pytest.raises(LiveUpdateError):
        creds.parse_status(7, "Name:\tx\n")
