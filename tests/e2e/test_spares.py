"""Userspace spares hold nothing and know nothing but what their adoption gives them
(ARCHITECTURE.md, "Spares"; :mod:`liveupdate.userspace.spare`, :mod:`liveupdate.kernel.spares`).

A spare waiting for adoption holds one fd, its adoption channel, and has an empty
environment. Once adopted, the program it runs sees exactly the fds, the environment and
the module-level values a freshly started interpreter with the same code imported would:
a probe run in a spare is compared with the same probe in a new interpreter. A template
that plants an fd, an environment variable and a module-level value makes each check fail.
On a machine, the next kernel's spares wait under it, in its domain, and become its
services; ``lu.spares=0`` turns them off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from liveupdate.abi import spare as abi
from liveupdate.abi.syscalls import SYSCALL_FD_ENV
from liveupdate.abi.wire import seqpacket_pair
from liveupdate.ipc import fds as scm
from tests.e2e.conftest import Factory
from tests.e2e.test_honesty import _descendants, _fds, _ppid, honesty_violations
from tests.e2e.unix_diag import unix_peers

TEMPLATE = [sys.executable, "-u", "-m", abi.TEMPLATE_MODULE, "--control-fd"]

# what a program knows: its fds, the C environment (not os.environ's copy), and every
# module-level value of the package's modules (simple values as they are, others by type)
PROBE = r'''
import ctypes, hashlib, json, os, sys

def value(v, depth=0):
    if v is None or isinstance(v, (bool, int, float, str, bytes)):
        return repr(v)[:200]
    if isinstance(v, (tuple, list, frozenset, set)) and depth < 2:
        return type(v).__name__ + repr(sorted(value(x, depth + 1) for x in v))[:400]
    if isinstance(v, dict) and depth < 2:
        return "dict" + repr(sorted((repr(k), value(x, depth + 1)) for k, x in v.items()))[:400]
    return type(v).__name__

environ = ctypes.POINTER(ctypes.c_char_p).in_dll(ctypes.CDLL(None), "environ")
env, i = [], 0
while environ[i]:
    env.append(environ[i].decode())
    i += 1
mods = {}
for name, m in sorted(sys.modules.items()):
    if name.startswith("liveupdate") and m is not None:
        items = sorted((k, value(v)) for k, v in vars(m).items()
                       if not k.startswith("__") and type(v) is not type(sys))  # submodules:
        # the module set says which are imported (the template's own is __main__ there)
        mods[name] = hashlib.sha256(repr(items).encode()).hexdigest()
def is_open(fd):
    try:
        os.fstat(fd)
        return True
    except OSError:  # listdir's own, closed by now
        return False

print(json.dumps({"fds": sorted(f for f in map(int, os.listdir("/proc/self/fd")) if is_open(f)),
                  "env": sorted(env), "modules": mods}))
'''

# a template that plants state where a spare keeps it: an fd opened while it waits, an
# environment variable in the template's own environment (env= below), a module-level value
PLANTING = r'''
import os, sys
import liveupdate.luod.daemon
from liveupdate.userspace import spare
liveupdate.luod.daemon.PLANTED = "a value no import makes"
waiting = spare._adopted
def planted(channel):
    fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(fd, 50)
    os.close(fd)
    return waiting(channel)
spare._adopted = planted
sys.argv[1:] = ["--control-fd", sys.argv[1]]
spare.main()
'''


def _template(argv: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[bytes], Any]:
    ours, theirs = seqpacket_pair()
    p = subprocess.Popen([*argv, str(theirs.fileno())], pass_fds=(theirs.fileno(),),
                         stdin=subprocess.DEVNULL, env=env, cwd="/")
    theirs.close()
    return p, ours


def _spare(control: Any) -> tuple[int, Any]:
    import socket

    scm.sendmsg(control, abi.ASK)
    raw, fds, _ = scm.recvmsg(control, 4096, 1)
    assert len(fds) == 1, raw
    return int(json.loads(raw)["pid"]), socket.socket(fileno=fds[0])


def waiting_violations(pid: int, channel_peer: int | None = None) -> list[str]:
    """What a waiting spare holds beyond its adoption channel (whose peer, when given, is
    ``channel_peer``'s inode), and an environment that is not empty."""
    bad = []
    held = _fds(pid)
    peers = unix_peers()
    socks = [(fd, obj) for fd, (obj, t) in held.items() if t.startswith("socket:")]
    if len(held) != 1 or len(socks) != 1:
        bad.append(f"holds {sorted(t for _, t in held.values())}, not its channel alone")
    elif channel_peer is not None and peers.get(socks[0][1][1]) != channel_peer:
        bad.append("its one socket is not the adoption channel")
    with open(f"/proc/{pid}/environ", "rb") as f:
        if f.read():
            bad.append("environment is not empty")
    return bad


def _probe_in_spare(channel: Any, env: dict[str, str]) -> dict[str, Any]:
    """Adopt the spare with the probe (no syscall connection: /dev/null in its place)."""
    rd, wr = os.pipe()
    with open(os.devnull, "rb") as null:
        scm.sendmsg(channel, abi.adoption([sys.executable, "-c", PROBE], env, "/"),
                    (null.fileno(), wr, wr, null.fileno()))
    os.close(wr)
    with os.fdopen(rd, "rb") as f:
        out = f.read()
    return dict(json.loads(out))


def _probe_fresh(env: dict[str, str]) -> dict[str, Any]:
    """The same probe in a new interpreter with the template's code imported, holding the
    same four fds."""
    code = f"import {abi.TEMPLATE_MODULE}\n" + PROBE
    with open(os.devnull, "rb") as null:
        r = subprocess.run([sys.executable, "-c", code], stdin=null, capture_output=True,
                           env=env, cwd="/", pass_fds=(null.fileno(),), check=True,
                           preexec_fn=lambda: os.dup2(0, abi.SYSCALL_AT))
    return dict(json.loads(r.stdout))


def adopted_violations(got: dict[str, Any], fresh: dict[str, Any],
                       env: dict[str, str]) -> list[str]:
    """What an adopted program knows that a fresh one would not."""
    bad = []
    extra_fds = set(got["fds"]) - {0, 1, 2, abi.SYSCALL_AT}
    if extra_fds:
        bad.append(f"fds {sorted(extra_fds)} beyond stdio and the syscall connection")
    if got["env"] != sorted(f"{k}={v}" for k, v in env.items()):
        bad.append(f"environment {got['env']} is not the one given")
    if set(got["modules"]) - set(fresh["modules"]):
        bad.append(f"modules no fresh start imports: {set(got['modules']) - set(fresh['modules'])}")
    changed = [m for m in got["modules"] if m in fresh["modules"]
               and got["modules"][m] != fresh["modules"][m]]
    if changed:
        bad.append(f"module-level values differ from a fresh start in {changed}")
    return bad


ENV = {"PYTHONUNBUFFERED": "1", SYSCALL_FD_ENV: str(abi.SYSCALL_AT), "PATH": "/usr/bin:/bin"}


def test_a_spare_holds_its_channel_and_knows_what_its_adoption_says() -> None:
    p, control = _template(TEMPLATE, {})
    try:
        pid, channel = _spare(control)
        assert waiting_violations(pid, channel_peer=os.fstat(channel.fileno()).st_ino) == []
        got = _probe_in_spare(channel, ENV)
        assert adopted_violations(got, _probe_fresh(ENV), ENV) == []
    finally:
        control.close()  # EOF: the template exits
        assert p.wait(30) == 0


def test_a_planted_fd_environment_and_module_value_are_caught() -> None:
    p, control = _template([sys.executable, "-u", "-c", PLANTING],
                           {"LU_PLANTED": "from the template"})
    try:
        pid, channel = _spare(control)
        # (the fd is planted while it waits: seen here too if it came first)
        assert "environment is not empty" in waiting_violations(pid)
        bad = adopted_violations(_probe_in_spare(channel, ENV), _probe_fresh(ENV), ENV)
        assert len(bad) == 2, bad
        assert bad[0].startswith("fds [50]"), bad
        assert "liveupdate.luod.daemon" in bad[1], bad
    finally:
        control.close()
        assert p.wait(30) == 0


SERVICE = f"{sys.executable} -c 'import signal; signal.pause()'\n"


def _services(tmp_path: Path, n: int) -> None:
    disk = tmp_path / "m0" / "disk"
    disk.mkdir(parents=True, exist_ok=True)
    (disk / "services").write_text(SERVICE * n)


def _cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().decode().split("\0")[:-1]


def _spares_of(kpid: int) -> list[int]:
    """The kernel's spare template and spares: forked from the kernel process, they keep its
    argv (the fork stands for an exec, kernel/spares.py)."""
    return [p for p in _descendants(kpid) if _cmdline(p) == _cmdline(kpid)]


def test_the_next_kernels_spares_wait_under_it_and_become_its_services(
        machine: Factory, tmp_path: Path) -> None:
    _services(tmp_path, 2)
    m = machine("kho=on")
    first = m.status()
    m.wait("(?s)init: started.*init: started", offset=0)
    services = [p for p in _spares_of(first["kernel_pid"]) if _ppid(p) == first["kernel_pid"]]
    assert len(services) == 3, services  # two adopted services and their template
    m.kexec_load(finalize=True)
    loaded = m.status()
    nxt = int(loaded["spare_pid"])
    m.kexec_load()  # loaded again, the same: the same next kernel, ready, with its spares
    assert m.status()["spare_pid"] == nxt
    waiting = [p for p in _spares_of(nxt) if _ppid(p) == nxt]
    assert len(waiting) == 3  # the template and two spares, the next kernel's children
    assert honesty_violations({"kernel_pid": nxt, "machine_pid": loaded["machine_pid"]},
                              loading=True) == []
    held = {obj[1] for obj, t in _fds(nxt).values() if t.startswith("socket:")}
    spares = [p for p in waiting if len(_fds(p)) == 1]
    assert len(spares) == 2
    for pid in spares:
        (obj, _), = _fds(pid).values()
        assert waiting_violations(pid) == [] and unix_peers()[obj[1]] in held
    st = m.kexec_exec()
    m.wait("(?s)init: started.*init: started", offset=first["console_bytes"])
    assert st["kernel_pid"] == nxt
    assert honesty_violations(m.status()) == []
    assert all(_ppid(p) == nxt for p in spares)  # the very spares, now its services


def test_spares_off_on_the_command_line(machine: Factory, tmp_path: Path) -> None:
    _services(tmp_path, 1)
    m = machine("kho=on lu.spares=0")
    st = m.status()
    m.wait("init: started")
    kids = [p for p in _descendants(st["kernel_pid"]) if _ppid(p) == st["kernel_pid"]]
    assert [_cmdline(p)[1:3] for p in kids] == [["-c", "import signal; signal.pause()"]]
    m.kexec_load(finalize=True)
    assert _spares_of(int(m.status()["spare_pid"])) == []
