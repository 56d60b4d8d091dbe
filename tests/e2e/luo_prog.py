"""Programs that run as userspace of an emulated LUO kernel (any generation), for e2e tests.

:func:`run` sends ``PRELUDE + body`` to the machine (``python -c``) and returns what the
program printed last, as JSON. The prelude gives the body a syscall connection ``k`` and the
kernel's uAPI generation ``G`` (from ``uname -r``, as userspace must), ``io(fd, NAME,
**fields)`` (one ioctl: the decoded reply struct, or ``{"errno": NAME}``), ``err(fn, ...)``,
``fill``/``digest`` (a pattern over a mapping and its checksum), session helpers (``create``,
``retrieve``, ``preserve``, ``restore_text``) and ``hold(result)``: print the result, then
keep every fd open in a daemon, as the kernel self-tests' ``daemonize_and_wait`` does, until
the reboot ends it. RLIMIT_NOFILE is raised to its hard limit, as the stress self-tests do.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

from liveupdate.abi import generations
from liveupdate.machine.client import MachineClient


def _sessions_behaviour(luo: str) -> generations.LuoGeneration:
    """What of a LUO row the sessions uAPI answers by: all but its name and the handlers of
    other file kinds (``7.3+posted`` answers every session case as 7.3)."""
    return dataclasses.replace(generations.LUO[luo], name="", files=())


# the releases whose LUO is the sessions front end (6.19 onward), oldest first, each with a
# sessions behaviour of its own
SESSION_GENERATIONS = list({
    _sessions_behaviour(r.luo): r.name for r in reversed(generations.RELEASES.values())
    if generations.LUO[r.luo].frontend == "sessions"}.values())[::-1]

# a program that keeps what it holds (its fds) across the update: says its result, then
# waits detached from the machine's run
HOLD = r'''
def hold(result):
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    if os.fork():
        os._exit(0)
    os.setsid()
    for fd in (0, 1, 2):
        os.close(fd)
    signal.pause()
'''

PRELUDE = r'''
import errno, hashlib, json, os, resource, signal, sys
from liveupdate.abi import uapi
from liveupdate.client.syscall import Kernel
from liveupdate.errors import LiveUpdateError
k = Kernel()
G = k.generation
resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)

def io(target, name, /, **fields):
    entry = G.ioctl(name)
    buf = bytearray(entry.pack(**fields))
    try:
        k.ioctl(target, entry.number, buf)
    except LiveUpdateError as e:
        return {"errno": e.errno_name}
    return entry.unpack(bytes(buf))

def err(fn, *a, **kw):
    try:
        fn(*a, **kw)
    except LiveUpdateError as e:
        return e.errno_name
    return "ok"

def fill(view, seed):
    import numpy as np  # here: most programs never fill, and numpy is ~0.1 s of start-up

    words = np.frombuffer(view, np.uint64)
    words[:] = np.arange(len(words), dtype=np.uint64) * np.uint64(2654435761) + np.uint64(seed)

def digest(view):
    return hashlib.blake2b(view, digest_size=16).hexdigest()

def create(dev, name):
    r = io(dev, "CREATE_SESSION", name=name.encode())
    return r.get("fd", r.get("errno"))

def retrieve(dev, name):
    r = io(dev, "RETRIEVE_SESSION", name=name.encode())
    return r.get("fd", r.get("errno"))

def memfd_with(text, size=4096, flags=0):
    fd = k.memfd_create("test_mfd", flags)
    k.ftruncate(fd, size)
    k.pwrite(fd, text.encode() + b"\0", 0)
    return fd

def preserve(sfd, token, text, size=4096):
    fd = memfd_with(text, size)
    r = io(sfd, "SESSION_PRESERVE_FD", fd=fd, token=token)
    os.close(fd)  # the kernel holds its own reference
    return r.get("errno", "ok")

def read_text(fd):
    return k.pread(fd, 4096, 0).split(b"\0")[0].decode()

def restore_text(sfd, token):
    r = io(sfd, "SESSION_RETRIEVE_FD", token=token)
    return r["errno"] if "errno" in r else read_text(r["fd"])

''' + HOLD


def run(m: MachineClient, body: str, timeout: float = 120) -> Any:
    r = m.run([sys.executable, "-c", PRELUDE + body], timeout=timeout)
    assert r["status"] == 0, r["stderr"][-4000:]
    lines = r["stdout"].strip().splitlines()
    assert lines, r["stderr"][-4000:]
    return json.loads(lines[-1])


def update(m: MachineClient, gen: str = "6.19", cmdline: str | None = None) -> dict[str, Any]:
    """kexec_file_load of ``images/<gen>.img`` and the jump; the machine's status after."""
    m.kexec_load(f"images/{gen}.img", cmdline=cmdline)
    st: dict[str, Any] = m.kexec_exec()
    return st


def luo(m: MachineClient) -> dict[str, Any]:
    """The kernel's LUO status (``luoctl kho status``'s ``luo``)."""
    status: dict[str, Any] = m.kho_status()["luo"]
    return status


def row(gen: str) -> generations.LuoGeneration:
    """The LUO generation row of release ``gen`` (what its kernel speaks)."""
    return generations.LUO[generations.RELEASES[gen].luo]


def one_per(*columns: str) -> list[str]:
    """The newest sessions generation of each distinct combination of ``columns`` of the
    LUO row (e.g. ``"luo"``: one per handover format): for a case whose answer those
    columns decide, each answer is still met, at one machine each instead of five."""
    newest: dict[tuple[str, ...], str] = {}
    for g in SESSION_GENERATIONS:  # in release order: the last one of a combination wins
        newest[tuple(getattr(row(g), c) for c in columns)] = g
    return sorted(newest.values(), key=SESSION_GENERATIONS.index)
