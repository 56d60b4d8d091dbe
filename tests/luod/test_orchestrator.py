"""luod's orchestration in process, against a fake kernel (tests/luod/fake_kernel.py) behind
its Backend interface: the phase guards (an operation in the wrong phase fails with the
guard's errno), a whole update per uAPI generation and custody, a refused prepare and an
administrator's cancel (nothing stays preserved), FINISH after the timeout, and at once when
nobody preserved anything. The real
machine runs the same daemon in tests/e2e/test_luod.py."""

from __future__ import annotations

import errno
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from liveupdate.abi.uapi import State
from liveupdate.client.luod import LuodClient
from liveupdate.errors import LiveUpdateError
from liveupdate.luod import custody, server
from liveupdate.luod.daemon import Luod
from liveupdate.luod.orchestrator import Quota, Timeouts
from liveupdate.luod.state import GUARDS, Phase
from tests.luod.fake_kernel import FakeBackend, FakeLuo, Rebooted

V3, V6_19, V7_1 = "6.17.0-lu-v3", "6.19.0-lu", "7.1.0-lu"
DATA = b"guest memory that must cross"


@dataclass
class Rig:
    tmp: Path
    luo: FakeLuo
    quota: Quota = field(default_factory=Quota)
    timeouts: Timeouts = field(default_factory=Timeouts)
    luods: list[Luod] = field(default_factory=list)
    clients: list[LuodClient] = field(default_factory=list)

    @property
    def sock(self) -> str:
        return str(self.tmp / "run" / "luod.sock")

    def start(self) -> Luod:
        d = Luod(FakeBackend(self.luo), self.sock, allow_uids=frozenset({os.getuid()}),
                 timeouts=self.timeouts, quota=self.quota)
        d.recover()
        d.listen()
        threading.Thread(target=d.serve_forever, daemon=True).start()
        self.luods.append(d)
        return d

    def client(self, name: str, **kw: object) -> LuodClient:
        c = LuodClient(name, path=self.sock, backend=FakeBackend(self.luo), **kw)  # type: ignore[arg-type]
        self.clients.append(c)
        return c

    def image(self) -> str:
        path = self.tmp / "next.img"
        path.write_bytes(b"not a kernel image header")  # a real bzImage names no generation
        return str(path)

    def reboot(self, d: Luod) -> None:
        """The update up to the kexec; then the next kernel."""
        with pytest.raises(Rebooted) as rebooted:
            d.update(self.image(), "", self.luo.release)
        self.stop()
        self.luo = rebooted.value.luo

    def stop(self) -> None:
        for c in self.clients:
            c.close()
        for d in self.luods:
            assert d.server is not None
            d.server.shutdown(socket.SHUT_RDWR)  # wakes the accept loop: it returns
            d.server.close()
        self.clients, self.luods = [], []


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path, FakeLuo(V6_19))
    yield r
    r.stop()


def _memfd(data: bytes) -> int:
    fd = os.memfd_create("guest")
    os.write(fd, data)
    return fd


@pytest.mark.parametrize("op", sorted(GUARDS))
@pytest.mark.parametrize("phase", list(Phase))
def test_an_operation_in_the_wrong_phase_fails_with_its_guards_errno(
        rig: Rig, op: str, phase: Phase) -> None:
    d = rig.start()
    guard = GUARDS[op]
    d.phase = phase
    call = {"load": lambda: d.load_alone(rig.image(), "", V6_19),
            "update": lambda: d.update(rig.image(), "", V6_19),
            "cancel": d.cancel, "finish": lambda: d.finish("test")}[op]
    if phase in guard.phases:
        return  # allowed: the other tests run these
    with pytest.raises(LiveUpdateError) as e:
        call()
    assert e.value.errno == guard.err, e.value
    assert phase.value in e.value.message
    assert d.phase is phase and not d.busy  # a refused operation changes nothing


def test_an_exclusive_operation_names_the_one_running(rig: Rig) -> None:
    d = rig.start()
    d.busy = "update"
    with pytest.raises(LiveUpdateError) as e:
        d.load_alone(rig.image(), "", V6_19)
    assert (e.value.errno, e.value.message) == (errno.EBUSY, "luod is update")


@pytest.mark.parametrize("release, quota, kind, mediated", [
    (V3, Quota(), custody.GlobalTokens, True),
    (V6_19, Quota(), custody.Sessions, False),
    (V6_19, Quota(files=4), custody.Sessions, True),
    (V7_1, Quota(), custody.Sessions, False),
])
def test_a_whole_update_per_custody(rig: Rig, release: str, quota: Quota,
                                    kind: type[custody.Custody], mediated: bool) -> None:
    rig.luo, rig.quota = FakeLuo(release), quota
    d = rig.start()
    assert type(d.custody) is kind and d.mediated is mediated
    fd = _memfd(DATA)
    acked: list[str] = []
    rig.client("vm0", on_prepare=lambda c: (c.preserve(fd, 7), acked.append("prepare")),
               on_freeze=lambda c: acked.append("freeze"))
    rig.reboot(d)
    assert acked == ["prepare", "freeze"]

    d = rig.start()  # the next kernel's luod finds its registry through LUO
    assert d.phase is Phase.UPDATED and d.reg.update == 1
    c = rig.client("vm0")
    assert c.restore and c.mediated is mediated
    got = c.retrieve(7)
    assert os.pread(got, len(DATA), 0) == DATA
    with pytest.raises(LiveUpdateError) as e:
        c.retrieve(8)  # not this client's
    assert e.value.errno == errno.ENOENT
    c.done()
    assert d.phase is Phase.NORMAL and d.last_error == ""
    assert d.reports[-1]["finish"] == "every client is done"
    if kind is custody.GlobalTokens:
        assert rig.luo.state is State.NORMAL  # SET_EVENT(FINISH)
    else:
        assert all(s.finished for s in rig.luo.sessions.values())


@pytest.mark.parametrize("release", [V3, V6_19])
def test_a_refused_prepare_cancels_and_nothing_stays_preserved(rig: Rig, release: str
                                                                ) -> None:
    rig.luo = FakeLuo(release)
    d = rig.start()
    fd = _memfd(DATA)
    cancelled = threading.Event()

    def prepare(c: LuodClient) -> None:
        c.preserve(fd, 1)
        raise OSError(errno.ENOMEM, "no memory for the state")

    rig.client("vm0", on_prepare=prepare, on_cancel=lambda c, why: cancelled.set())
    with pytest.raises(LiveUpdateError) as e:
        d.update(rig.image(), "", release)
    assert e.value.errno == errno.ECANCELED and "client vm0 failed prepare" in e.value.message
    assert cancelled.wait(10)
    assert d.phase is Phase.NORMAL and "vm0 failed prepare" in d.last_error
    assert rig.luo.preserved() == {}  # v3: CANCEL and unpreserved; 6.19: sessions closed
    assert all(not r.tokens and not r.session for r in d.records.values())


def test_a_host_error_mid_update_cancels_it(rig: Rig, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    """An OSError luod did not expect (its registry's disk full) is the update's error, with
    its errno, and the update is cancelled: nothing half done."""
    d = rig.start()
    fd = _memfd(DATA)
    cancelled = threading.Event()
    rig.client("vm0", on_prepare=lambda c: c.preserve(fd, 1),
               on_cancel=lambda c, why: cancelled.set())

    def full(*_: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "registry")

    monkeypatch.setattr(d, "_write_registry", full)
    with pytest.raises(LiveUpdateError) as e:
        d.update(rig.image(), "", rig.luo.release)
    assert e.value.errno == errno.ENOSPC and "No space left" in e.value.message
    assert cancelled.wait(10)  # the client heard of it (and dropped what it had preserved)
    assert d.phase is Phase.NORMAL and "No space left" in d.last_error
    assert rig.luo.preserved() == {}


def test_an_administrators_cancel_resumes_every_client(rig: Rig) -> None:
    d = rig.start()
    in_prepare, release = threading.Event(), threading.Event()
    cancelled: list[str] = []

    def prepare(c: LuodClient) -> None:
        in_prepare.set()
        release.wait(10)

    rig.client("vm0", on_prepare=prepare, on_cancel=lambda c, why: cancelled.append(why))
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            d.update(rig.image(), "", V6_19)
        except (LiveUpdateError, Rebooted) as e:
            outcome.append(e)

    t = threading.Thread(target=run)
    t.start()
    assert in_prepare.wait(10)
    assert d.phase is Phase.PREPARED
    status = d.ops.status_fields()
    d.cancel()
    assert d.phase is Phase.NORMAL and d.last_error == "cancelled by an administrator"
    release.set()
    t.join(20)
    assert outcome and isinstance(outcome[0], LiveUpdateError)  # the update did not go on
    assert d.phase is Phase.NORMAL and rig.luo.preserved() == {}
    assert status["phase"] == "prepared"


def test_finish_after_the_timeout_reclaims_what_nobody_claimed(rig: Rig) -> None:
    d = rig.start()
    fd = _memfd(DATA)
    rig.client("vm0", on_prepare=lambda c: c.preserve(fd, 1))
    rig.reboot(d)
    rig.timeouts = Timeouts(finish=0.0)
    d = rig.start()  # vm0 never comes back
    with d.cond:
        assert d.cond.wait_for(lambda: d.phase is Phase.NORMAL, 10)
    assert d.last_error.startswith("FINISH: timeout after 0.0s; unclaimed resources of vm0")


def test_an_update_nobody_preserved_for_finishes_at_once(rig: Rig) -> None:
    d = rig.start()  # no client: only luod's registry crosses
    rig.reboot(d)
    rig.timeouts = Timeouts(finish=3600.0)
    d = rig.start()
    assert d.phase is Phase.NORMAL and not d.last_error  # not left waiting for the hour
    assert d.reports[-1]["finish"] == "no client preserved anything"


def test_a_second_luod_cannot_have_the_device(rig: Rig) -> None:
    rig.start()
    with pytest.raises(LiveUpdateError) as e:
        Luod(FakeBackend(rig.luo), rig.sock + "2", allow_uids=frozenset())
    assert e.value.errno == errno.EBUSY


def test_conn_send_to_a_gone_peer_marks_it_dead() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    b.close()
    c = server.Conn(a, 0, 0, "x")
    c.send({"event": "prepare"})
    assert not c.alive
    a.close()
