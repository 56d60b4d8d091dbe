"""The real backend sends the very struct bytes the emulated kernel is sent (invariant 4),
and runs for real where a /dev/liveupdate exists."""

from __future__ import annotations

import os
from typing import Any

import pytest

from liveupdate.abi import uapi, uapi_generation, wire
from liveupdate.abi.uapi import Gen
from liveupdate.client import backends, device
from liveupdate.client.syscall import Kernel


class Recorder(Kernel):
    """The emulated transport with the socket replaced: what would be sent, is recorded."""

    def __init__(self, release: str) -> None:
        self.sent: list[tuple[str, bytes, dict[str, Any]]] = []
        self.release = release
        self._gen = None

    def call_fds(self, op: str, payload: bytes = b"", fds: list[int] | None = None,
                 **args: Any) -> wire.Message:
        self.sent.append((op, payload, args))
        fds = [os.dup(0)] if op == "open" else []  # open returns a handle
        return wire.Message({"release": self.release}, payload, fds)


@pytest.mark.parametrize("gen, release", [(Gen.V3, "6.17.0-lu-v3"), (Gen.V6_19, "6.19.0")])
def test_real_and_emulated_backends_send_the_same_struct_bytes(
        gen: Gen, release: str, monkeypatch: pytest.MonkeyPatch) -> None:
    real: list[tuple[int, int, bytes]] = []

    def fake_ioctl(fd: int, cmd: int, buf: bytearray, mutate: bool) -> int:
        real.append((fd, cmd, bytes(buf)))
        return 0

    monkeypatch.setattr(backends.fcntl, "ioctl", fake_ioctl)
    monkeypatch.setattr(backends.RealBackend, "uname", lambda self: release)
    monkeypatch.setattr(backends.RealBackend, "open", lambda self, path: 99)
    rec = Recorder(release)
    emu = backends.EmulatedBackend(rec)
    for backend in (backends.RealBackend(), emu):
        dev = device.LiveUpdate(backend)
        if gen is Gen.V3:
            dev.set_event(uapi.Event.PREPARE)
            dev.fd_unpreserve(0x1234)
        else:
            device.Session(backend, uapi_generation.BY_GEN[gen], 98, "s").finish()
    emulated = [(p, a["cmd"]) for op, p, a in rec.sent if op == "ioctl"]
    assert [(cmd, raw) for _, cmd, raw in real] == [(cmd, raw) for raw, cmd in emulated]
    assert real and all(len(raw) == uapi.entry_for(gen, cmd).size  # type: ignore[union-attr]
                        for _, cmd, raw in real)


@pytest.mark.skipif(not os.path.exists("/dev/liveupdate"),
                    reason="no /dev/liveupdate on this host (a Linux 6.19+ kernel booted with "
                           "liveupdate=on kho=on has one)")
def test_real_device() -> None:
    dev = device.LiveUpdate(backends.RealBackend())
    assert dev.gen.gen in (Gen.V6_19, Gen.V7_1)
    s = dev.create_session(f"liveupdate-test-{os.getpid()}")
    fd = os.memfd_create("t")
    os.write(fd, b"hello")
    s.preserve_fd(fd, 1)
    s.close()  # dropping the session unpreserves: nothing crosses a reboot
    dev.close()
