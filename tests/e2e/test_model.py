"""A model of the whole orchestration, checked by machine (hypothesis ``RuleBasedStateMachine``)
against a real emulated machine running luod: clients register memfds of known contents,
crash, updates run (or fail to load, or are cancelled by a client that never acknowledges),
the next kernel's clients retrieve and FINISH comes, and the power goes. After every step:
luod is in one of LUO's states; nothing stays preserved without an owner; no preserved page
is lost (every client's memfds read back with their digests) or handed to another client.

CI runs a bounded number of steps; ``LIVEUPDATE_MODEL_EXAMPLES`` / ``LIVEUPDATE_MODEL_STEPS``
run it longer (e.g. 20 / 40).
"""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import sys
import tempfile
from typing import Any

import pytest
from hypothesis import Verbosity, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from liveupdate.abi import image
from liveupdate.client.update import admin, luod_status, run_update
from liveupdate.errors import LiveUpdateError
from liveupdate.machine.client import start
from liveupdate.userspace.luod_client import digest, pattern

PY = sys.executable
NAMES = ("a", "b", "c")
STATES = {"normal", "prepared", "frozen", "updated"}  # the seed's, less the kexec itself
CMDLINE = "kho=on liveupdate=on"
LUOD = f"@restart {PY} -m liveupdate.cli.luod --prepare-timeout 2 --freeze-timeout 2 " \
       "--finish-timeout 30"


class Orchestration(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory(prefix="lu-model-")
        folder = os.path.join(self.tmp.name, "m")
        disk = os.path.join(folder, "disk")
        os.makedirs(os.path.join(disk, "images"))
        with open(os.path.join(disk, "images", "6.19.img"), "wb") as f:
            f.write(image.KernelImage().encode())
        with open(os.path.join(disk, "images", "junk.img"), "wb") as f:
            f.write(b"not a kernel")
        with open(os.path.join(disk, "services"), "w") as f:
            f.write(LUOD + "\n")
        self.proc, self.m = start(folder, memory=1 << 30, cmdline=CMDLINE,
                                  image="images/6.19.img", log=folder + ".log")
        self.m.booted(60)
        self.m.wait("luod: LUO .* listening")
        self.sock = self.m.dir + "/run/luod.sock"
        self.baseline = self._preserved()
        self.held: dict[str, dict[int, int]] = {}  # running holders: tokens -> sizes
        self.pids: dict[str, int] = {}
        self.pending: dict[str, dict[int, int]] = {}  # preserved, to retrieve after a kexec

    def teardown(self) -> None:
        self.m.shutdown()
        self.proc.wait(30)
        self.tmp.cleanup()

    # -- helpers --------------------------------------------------------------------------
    def _preserved(self) -> int:
        return int(self.m.kho_status()["out"]["preserved_pages"])

    def _luod(self) -> dict[str, Any]:
        return luod_status(self.sock)

    def _restore(self, name: str, tokens: list[int]) -> dict[str, Any]:
        r = self.m.run([PY, "-m", "liveupdate.userspace.luod_client", "restore", name,
                        *[hex(t) for t in tokens]])
        assert r["status"] == 0, r["stderr"]
        got: dict[str, Any] = json.loads(r["stdout"])
        return got

    # -- rules ----------------------------------------------------------------------------
    @initialize(name=st.sampled_from(NAMES), token=st.integers(1, 3),
                size=st.sampled_from([4096, 65536, 1 << 20]))
    def first_client(self, name: str, token: int, size: int) -> None:
        self.register(name, token, size)

    @precondition(lambda self: not self.pending)
    @rule(name=st.sampled_from(NAMES), token=st.integers(1, 3),
          size=st.sampled_from([4096, 65536, 1 << 20]))
    def register(self, name: str, token: int, size: int) -> None:
        if name in self.held:
            return  # one holder per name
        r = self.m.run([PY, "-m", "liveupdate.userspace.luod_client", "hold", name,
                        f"{token}:{size}"])
        assert r["status"] == 0, r["stderr"]
        self.held[name] = {token: size}
        self.pids[name] = int(json.loads(r["stdout"])["pid"])

    @precondition(lambda self: bool(self.held) and not self.pending)
    @rule(data=st.data())
    def crash(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.held)))
        kill(self.pids.pop(name))
        del self.held[name]

    @precondition(lambda self: not self.pending)
    @rule()
    def update(self) -> None:
        """Ask luod for the update and follow it to the next kernel's luod -- without
        waiting for FINISH, which needs the clients' retrieves (the rule below)."""
        st0 = self.m.status()
        c = admin(self.sock)
        try:
            c.request("update", image="images/6.19.img")
            raise AssertionError("luod answered instead of rebooting")
        except LiveUpdateError as e:
            assert e.errno == errno.ECONNRESET, e  # luod went away: the kexec
        finally:
            c.close()
        self.m.wait("luod: LUO .* listening", offset=st0["console_bytes"], timeout=60)
        assert self.m.status()["boot_count"] == st0["boot_count"] + 1
        self.pending, self.held, self.pids = self.held, {}, {}
        if not self.pending:
            self._wait_normal()

    @precondition(lambda self: not self.pending)
    @rule()
    def failed_load(self) -> None:
        self._update_fails("images/junk.img", "names no LUO generation")

    def _update_fails(self, img: str, reason: str) -> None:
        with pytest.raises(LiveUpdateError) as e:
            run_update(self.sock, image=img)
        assert reason in e.value.message, e.value.message

    @precondition(lambda self: not self.pending)
    @rule()
    def cancelled_by_a_client(self) -> None:
        """A client that never acknowledges prepare: luod cancels, everyone resumes."""
        r = self.m.run([PY, "-m", "liveupdate.userspace.luod_client", "hold", "stuck",
                        "9:4096", "--fault", "no-prepare-ack"])
        assert r["status"] == 0, r["stderr"]
        stuck = int(json.loads(r["stdout"])["pid"])
        try:
            self._update_fails("images/6.19.img", "did not acknowledge prepare")
        finally:
            kill(stuck)

    @precondition(lambda self: bool(self.pending))
    @rule(data=st.data())
    def retrieve(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.pending)))
        mine = self.pending.pop(name)
        others = [t for n, ts in self.pending.items() for t in ts if t not in mine]
        got = self._restore(name, [*mine, *others])
        for token, size in mine.items():
            want = {"digest": digest(pattern(name, token, size)), "marker": "FROZEN",
                    "size": size}
            assert got["memfds"][hex(token)] == want, (name, got)
        for token in others:  # another client's token is never this one's
            assert got["memfds"][hex(token)] == {"errno": "ENOENT"}, (name, got)
        if not self.pending:
            self._wait_normal()

    @rule()
    def power_loss(self) -> None:
        off = self.m.status()["console_bytes"]
        self.m.power_cycle()
        self.m.booted(60)
        self.m.wait("luod: LUO .* listening", offset=off)
        self.held, self.pids, self.pending = {}, {}, {}

    def _wait_normal(self) -> None:
        c = admin(self.sock)
        try:
            c.request("wait", timeout=60)
        finally:
            c.close()

    # -- invariants -----------------------------------------------------------------------
    @invariant()
    def luod_is_in_a_luo_state(self) -> None:
        st_ = self._luod()
        assert st_["phase"] in STATES, st_
        assert (st_["phase"] == "updated") == bool(self.pending), (st_["phase"], self.pending)

    @invariant()
    def nothing_preserved_without_an_owner(self) -> None:
        if not self.pending:  # between updates nothing may stay pinned for the next kernel
            assert self._preserved() == self.baseline

    @invariant()
    def luod_knows_exactly_the_running_clients(self) -> None:
        if not self.pending:
            names = {c["name"] for c in self._luod()["clients"]}
            assert set(self.held) <= names, (self.held, names)


def kill(pid: int) -> None:
    """SIGKILL, then wait until the process is gone (its pidfd turns readable once it has
    exited and its fds are closed): the next rule must not race its teardown -- a session fd
    it still holds keeps the session's name taken."""
    pidfd = os.pidfd_open(pid)
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        if not select.select([pidfd], [], [], 60)[0]:
            raise AssertionError(f"pid {pid} outlived SIGKILL by 60 s")
    finally:
        os.close(pidfd)


Orchestration.TestCase.settings = settings(
    max_examples=int(os.environ.get("LIVEUPDATE_MODEL_EXAMPLES", "6")),
    stateful_step_count=int(os.environ.get("LIVEUPDATE_MODEL_STEPS", "6")),
    deadline=None,
    verbosity=Verbosity.verbose if os.environ.get("LIVEUPDATE_MODEL_VERBOSE") else
    Verbosity.normal)
TestOrchestration = pytest.mark.long(Orchestration.TestCase)
