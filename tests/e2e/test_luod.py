"""luod on the emulated machine, for both uAPI generations: clients keep their memfds across
real live updates driven by ``luoctl update``, and every fault ends in a defined state."""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from liveupdate.abi import image
from liveupdate.errors import LiveUpdateError
from liveupdate.ipc import framing
from liveupdate.ipc.service import ask
from liveupdate.machine.client import MachineClient
from liveupdate.userspace.luod_client import digest, pattern
from tests.e2e.conftest import Factory

CMDLINE = "kho=on liveupdate=on transparent_hugepage_shmem=within_size"
IMAGES = {g: image.KernelImage.of(g) for g in ("v3", "6.19", "7.2")}
PY = sys.executable
LUOD = f"@restart {PY} -m liveupdate.cli.luod --prepare-timeout 5 --freeze-timeout 5 " \
       "--finish-timeout 60"
Machine = Callable[..., MachineClient]


@pytest.fixture
def lu(machine: Factory, tmp_path: Path) -> Iterator[Machine]:
    def make(gen: str, extra: str = "", luod_args: str = "") -> MachineClient:
        disk = tmp_path / "m0" / "disk"
        (disk / "images").mkdir(parents=True, exist_ok=True)
        for name, img in IMAGES.items():
            (disk / "images" / f"{name}.img").write_bytes(img.encode())
        (disk / "images" / "junk.img").write_bytes(b"not a kernel")
        (disk / "services").write_text(f"{LUOD} {luod_args}\n")
        m = machine(f"{CMDLINE} {extra}".strip(), image=f"images/{gen}.img")
        m.wait("luod: LUO .* listening")
        return m
    yield make


def luoctl(m: MachineClient, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "liveupdate.cli.luoctl", *args], capture_output=True,
                          text=True, timeout=180, env={**os.environ,
                                                       "LIVEUPDATE_MACHINE": m.dir})


def hold(m: MachineClient, name: str, *specs: str, fault: str = "none") -> dict:
    r = m.run([PY, "-m", "liveupdate.userspace.luod_client", "hold", name, *specs,
               "--fault", fault])
    assert r["status"] == 0, r["stderr"]
    got: dict = json.loads(r["stdout"])
    return got


def restore(m: MachineClient, name: str, *tokens: str) -> dict:
    r = m.run([PY, "-m", "liveupdate.userspace.luod_client", "restore", name, *tokens])
    assert r["status"] == 0, r["stderr"]
    got: dict = json.loads(r["stdout"])
    return got


def status(m: MachineClient) -> dict:
    r = luoctl(m, "status", "--json")
    assert r.returncode == 0, r.stderr
    st: dict = json.loads(r.stdout)
    return st


def want(name: str, token: int, size: int) -> dict:
    return {"digest": digest(pattern(name, token, size)), "marker": "FROZEN", "size": size}


@pytest.mark.parametrize("gen", ["v3", "6.19"])
def test_two_clients_five_updates(lu: Machine, gen: str) -> None:
    m = lu(gen)
    for n in range(1, 6):
        hold(m, "vm0", "0x1:4194304", "0x2:65536")
        hold(m, "vm1", "0x1:2097152", "0x3:4096")  # one page: found by the model
        off = m.status()["console_bytes"]
        upd = subprocess.Popen([PY, "-m", "liveupdate.cli.luoctl", "update", "--image",
                                f"images/{gen}.img", "--json"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "LIVEUPDATE_MACHINE": m.dir})
        m.wait(f"luod: LUO {gen}, updated", offset=off, timeout=120)
        # as a script on a real host follows it: the kexec ended `luoctl update` there
        waiter = subprocess.Popen([PY, "-m", "liveupdate.cli.luoctl", "wait", "--update",
                                   str(n), "--json"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, "LIVEUPDATE_MACHINE": m.dir}) \
            if n == 1 else None
        got0 = restore(m, "vm0", "0x1", "0x2")
        got1 = restore(m, "vm1", "0x1", "0x2", "0x3")  # 0x2 is vm0's: not vm1's to take
        out, err = upd.communicate(timeout=120)
        assert upd.returncode == 0, err
        report = json.loads(out)
        if waiter is not None:  # it waited for the FINISH, and says what `update` says
            w_out, w_err = waiter.communicate(timeout=120)
            assert waiter.returncode == 0, w_err
            assert json.loads(w_out)["report"] == report["report"]
            r = luoctl(m, "wait", "--update", "2", "--timeout", "5")
            assert r.returncode == 1 and "update 2 did not happen (luod is at update 1)" \
                in r.stderr, r.stderr
        assert report["status"]["update"] == n and report["status"]["phase"] == "normal"
        assert {"prepared", "frozen", "reboot", "updated", "normal"} <= set(
            report["report"]["timeline"])
        assert got0["restore"] and got0["memfds"] == {"0x1": want("vm0", 1, 4 << 20),
                                                      "0x2": want("vm0", 2, 64 << 10)}
        assert got1["memfds"] == {"0x1": want("vm1", 1, 2 << 20), "0x2": {"errno": "ENOENT"},
                                  "0x3": want("vm1", 3, 4096)}
        assert report["report"]["finish"] == "every client is done"


def test_second_luod_and_unprivileged_clients_are_refused(lu: Machine) -> None:
    public = tempfile.TemporaryDirectory(prefix="luod-")  # nobody can reach it: the
    os.chmod(public.name, 0o755)                            # policy, not the path, decides
    sock = Path(public.name) / "luod.sock"
    m = lu("6.19", f"lu.rw={public.name}", luod_args=f"--socket {sock} --socket-mode 0666")
    r = m.run([PY, "-m", "liveupdate.cli.luod", "--socket", m.dir + "/run/other.sock"])
    assert r["status"] == 1 and "EBUSY" in r["stderr"], r
    nobody = ("import os\nfrom liveupdate.client.luod import LuodClient\n"
              "from liveupdate.errors import LiveUpdateError\n"
              "os.setgid(65534)\nos.setuid(65534)\n"
              f"try:\n    LuodClient('intruder', path={str(sock)!r})\n"
              "except LiveUpdateError as e:\n    print(e.errno_name, e.message)\n")
    r = m.run([PY, "-c", nobody])
    assert r["stdout"].startswith("EPERM uid 65534 is not allowed"), r
    r = luoctl(m, "status", "--json", "--socket", str(sock))
    assert json.loads(r.stdout)["clients"] == []
    public.cleanup()


def _update_fails(m: MachineClient, gen: str, image_name: str | None = None) -> str:
    r = luoctl(m, "update", "--image", f"images/{image_name or gen}.img")
    assert r.returncode == 1, r.stdout
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    return r.stderr.strip()


@pytest.mark.parametrize("fault, reason", [
    ("die-in-prepare", "went away during prepare"),
    ("no-freeze-ack", "did not acknowledge freeze"),
])
def test_misbehaving_client_cancels_the_update(lu: Machine, fault: str, reason: str) -> None:
    m = lu("6.19", luod_args="--freeze-timeout 2")  # the stuck client is given up sooner
    hold(m, "good", "0x1:1048576")
    bad = hold(m, "bad", "0x1:1048576", fault=fault)
    assert reason in _update_fails(m, "6.19")
    st = status(m)
    assert st["phase"] == "normal" and reason in st["last_error"]
    # luod closed every session it held; only a client stuck in its callback still holds its
    # own (the kernel keeps what an open fd holds), and it is the stuck one's
    held = [s["name"] for s in m.kho_status()["luo"]["sessions"]]
    assert held == ([] if fault == "die-in-prepare" else ["0:bad"])
    assert m.status()["boot_count"] == 1  # no kexec happened
    # the good client resumed: its memfd is its own again and can go through an update
    off = m.status()["console_bytes"]
    if fault != "die-in-prepare":
        os.kill(bad["pid"], signal.SIGKILL)  # the stuck one goes; the good one stays
    upd = subprocess.Popen([PY, "-m", "liveupdate.cli.luoctl", "update", "--image",
                            "images/6.19.img"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env={**os.environ, "LIVEUPDATE_MACHINE": m.dir})
    m.wait("luod: LUO 6.19, updated", offset=off, timeout=120)
    assert restore(m, "good", "0x1")["memfds"] == {"0x1": want("good", 1, 1 << 20)}
    out, err = upd.communicate(timeout=120)
    assert upd.returncode == 0, err
    assert "every client is done" in out  # nobody left behind was waited for


def test_luod_killed_in_prepared(lu: Machine) -> None:
    m = lu("6.19")
    hold(m, "vm0", "0x1:1048576")
    hold(m, "stuck", "0x1:4096", fault="no-prepare-ack")
    pid = status(m)["pid"]
    upd = subprocess.Popen([PY, "-m", "liveupdate.cli.luoctl", "update", "--image",
                            "images/6.19.img"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env={**os.environ, "LIVEUPDATE_MACHINE": m.dir})
    m.wait("luod: prepare: prepared", timeout=60)
    off = m.status()["console_bytes"]
    os.kill(pid, signal.SIGKILL)
    m.wait("luod: LUO 6.19, normal, listening", offset=off, timeout=60)  # init restarted it
    upd.communicate(timeout=60)
    assert upd.returncode == 1
    st = status(m)
    assert st["phase"] == "normal" and "ended while prepared" in st["last_error"]
    assert st["pid"] != pid and m.status()["boot_count"] == 1
    r = luoctl(m, "wait", "--update", "1")  # what a script following it learns
    assert r.returncode == 1 and "ended while prepared" in r.stderr, r.stderr


def test_bad_images_are_refused_before_anyone_pauses(lu: Machine) -> None:
    m = lu("6.19")
    hold(m, "vm0", "0x1:65536")
    reason = _update_fails(m, "6.19", "v3")  # v3 cannot read the 6.19 handover
    assert "cannot take this handover: it cannot read luo-v1 (luo) -- Linux would panic" \
        in reason
    st = status(m)
    assert st["phase"] == "normal" and "cannot take this handover" in st["last_error"]
    assert m.kho_status()["luo"]["sessions"] == [] and m.status()["boot_count"] == 1


def test_preflight_says_what_the_update_will_do(lu: Machine) -> None:
    """Native, negotiated or refused -- before anyone pauses."""
    m = lu("7.2")
    r = luoctl(m, "load", "images/7.2.img", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["handover"] == {"mode": "native", "formats": {
        "kho": "kho-v4", "luo": "luo-v5", "flb": "luo-flb-v1", "memfd": "memfd-v2"}}
    r = luoctl(m, "load", "images/6.19.img")
    assert r.returncode == 1 and "it cannot read kho-v4 (kho) -- Linux would cold boot" \
        in r.stderr, r.stderr
    line = f"{CMDLINE} liveupdate_negotiate=on"
    r = luoctl(m, "load", "images/6.19.img", "--cmdline", line)
    assert r.returncode == 1 and "cold boot" in r.stderr  # this kernel does not negotiate


def test_preflight_with_negotiation(lu: Machine) -> None:
    m = lu("7.2", "liveupdate_negotiate=on")
    r = luoctl(m, "load", "images/6.19.img")
    assert r.returncode == 0, r.stderr
    assert "negotiated handover: kho kho-v1, luo luo-v1, flb none, memfd memfd-v1" in r.stdout
    r = luoctl(m, "load", "images/v3.img", "--json")
    assert r.returncode == 1 and "negotiation with the next kernel (6.17.0-lu-v3)" in r.stderr


def test_junk_image_fails_to_load(lu: Machine) -> None:
    m = lu("v3")
    reason = _update_fails(m, "v3", "junk")
    assert "names no LUO generation" in reason
    assert status(m)["phase"] == "normal"


def test_failing_freeze_in_reboot_cancels(lu: Machine) -> None:
    m = lu("v3", "luo_fail=freeze")
    hold(m, "vm0", "0x1:1048576")
    r = luoctl(m, "update", "--image", "images/v3.img")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    reason = r.stderr.strip()
    # frozen, it said how to follow the update from the next kernel, where a real host's
    # kexec would have ended it (here the freeze failed inside reboot(): no kexec)
    assert r.stdout == "update 1: frozen, the kexec follows; if this process ends with its " \
        "kernel, `luoctl wait --update 1` in the next one reports the outcome\n"
    assert "luo_fail: injected freeze failure" in reason
    st = status(m)
    assert st["phase"] == "normal" and "freeze" in st["last_error"]
    assert m.kho_status()["luo"]["state"] == "normal" and m.kho_status()["luo"]["files"] == []
    assert m.status()["boot_count"] == 1


def test_finish_after_timeout_reclaims_what_nobody_claimed(lu: Machine) -> None:
    m = lu("6.19", luod_args="--finish-timeout 2")
    hold(m, "vm0", "0x1:2097152")
    r = luoctl(m, "update", "--image", "images/6.19.img", "--json")  # vm0 never comes back
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)["report"]
    assert "timeout after 2.0s; unclaimed resources of vm0 (uid 0) reclaimed" in \
        report["finish"]
    assert m.kho_status()["luo"]["incoming"] == []  # finished and released: gone
    assert restore(m, "vm0", "0x1")["memfds"]["0x1"] == {"errno": "ENOENT"}


def test_garbage_on_luod_and_service_sockets_gets_errors(lu: Machine) -> None:
    m = lu("6.19")
    path = m.dir + "/run/luod.sock"
    def exchange(*records: bytes) -> list[str | None]:
        out = []
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.connect(path)
            for raw in records:
                s.send(raw)
                out.append(json.loads(s.recv(65536)).get("errno"))
        return out

    # malformed records are answered and the connection stays usable ...
    assert exchange(b"\xff not json", b"[1, 2]") == ["EPROTO", "EPROTO"]
    # ... a refused hello ends it
    for bad, err in (({"op": "status"}, "EPROTO"), ({"op": "hello", "v": 9, "name": "x"},
                                                    "EPROTO"),
                     ({"op": "hello", "v": 1, "name": "no spaces allowed"}, "EINVAL"),
                     ({"op": "hello", "v": 1, "name": 7}, "EINVAL")):
        assert exchange(json.dumps(bad).encode()) == [err]
    with pytest.raises(LiveUpdateError) as e:
        ask(path, "status")  # an admin op before hello
    assert e.value.errno == errno.EPROTO
    assert status(m)["phase"] == "normal"  # still serving


def _as_nobody(m: MachineClient, sock: str, *argv: str) -> dict:
    """luod_client run under the real unprivileged uid 65534, talking to ``sock``."""
    r = m.run(["/usr/bin/env", f"LUOD_SOCKET={sock}", PY, "-m",
               "liveupdate.userspace.luod_client", *argv, "--user", "65534"])
    assert r["status"] == 0, r["stderr"]
    got: dict = json.loads(r["stdout"])
    return got


def test_quotas_bound_each_client_and_an_unprivileged_one_keeps_its_memfds(lu: Machine) -> None:
    public = tempfile.TemporaryDirectory(prefix="luod-")
    os.chmod(public.name, 0o755)
    sock = str(Path(public.name) / "luod.sock")
    m = lu("6.19", f"lu.rw={public.name}",
           luod_args=f"--socket {sock} --socket-mode 0666 --allow-uid 65534 "
                             "--quota-files 2 --quota-bytes 1M")
    _as_nobody(m, sock, "hold", "guest", "0x1:65536", "0x2:65536")
    for name, specs, why in (("greedy", ["0x1:4096", "0x2:4096", "0x3:4096"],
                              "quota of 2 preserved files reached"),
                             ("fat", ["0x1:2097152"], "would pass the quota of 1048576")):
        r = m.run([PY, "-c", f"import os; os.environ['LUOD_SOCKET'] = {sock!r}\n"
                   "from liveupdate.userspace.luod_client import main\n"
                   f"raise SystemExit(main(['hold', {name!r}, *{specs!r}]))"])
        assert r["status"] == 0, r["stderr"]
        pid = json.loads(r["stdout"])["pid"]
        reason = luoctl(m, "update", "--image", "images/6.19.img", "--socket", sock)
        assert reason.returncode == 1
        assert f"client {name} failed prepare: {name}: " in reason.stderr and why in \
            reason.stderr, reason.stderr
        assert m.kho_status()["luo"]["sessions"] == []  # nothing stays preserved
        os.kill(pid, signal.SIGKILL)
    off = m.status()["console_bytes"]
    upd = subprocess.Popen([PY, "-m", "liveupdate.cli.luoctl", "update", "--image",
                            "images/6.19.img", "--socket", sock], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "LIVEUPDATE_MACHINE": m.dir})
    m.wait("luod: LUO 6.19, updated", offset=off, timeout=120)
    got = _as_nobody(m, sock, "restore", "guest", "0x1", "0x2")
    assert got["memfds"] == {"0x1": want("guest", 1, 65536), "0x2": want("guest", 2, 65536)}
    _, err = upd.communicate(timeout=120)
    assert upd.returncode == 0, err
    public.cleanup()


def test_luod_out_of_fds_keeps_serving(lu: Machine) -> None:
    """accept() failing with EMFILE used to end luod's serve loop (and luod); it waits."""
    m = lu("6.19")
    pid = status(m)["pid"]
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    off = m.status()["console_bytes"]
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (3, hard))  # open fds stay; new ones fail
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.connect(m.dir + "/run/luod.sock")  # waits in the backlog: luod has no fd for it
        m.wait("luod: accept: Too many open files; retrying", offset=off)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        framing.send(s, {"op": "hello", "id": 1, "v": 1, "name": "late", "role": "admin"})
        got = framing.recv(s)
        assert got is not None and got[0]["ok"], got
    st = status(m)
    assert st["pid"] == pid and st["phase"] == "normal"  # the same luod, still serving
