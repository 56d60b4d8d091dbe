"""Programs that run as userspace of an emulated LUO v3 kernel, for the e2e tests.

:func:`run` sends ``PRELUDE + body`` to the machine (``python -c``) and returns what the
program printed last, as JSON. The prelude gives the body a syscall connection ``k``,
``io(dev, NAME, **fields)`` (one v3 ioctl: the decoded reply struct, or
``{"errno": NAME}``), ``fill``/``digest`` (a pattern over a mapping and its checksum), and
``hold(result)``: print the result, then keep every fd open in a daemon, as the kernel
self-tests' ``daemonize_and_wait`` does, until the reboot ends it.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from liveupdate.machine.client import MachineClient

PRELUDE = r'''
import errno, hashlib, json, os, signal, sys
import numpy as np
from liveupdate.abi import uapi
from liveupdate.client.syscall import Kernel
from liveupdate.errors import LiveUpdateError
k = Kernel()
G = uapi.Gen.V3

def io(dev, name, **fields):
    entry = uapi.ioctl(G, name)
    buf = bytearray(entry.pack(**fields))
    try:
        k.ioctl(dev, entry.number, buf)
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
    words = np.frombuffer(view, np.uint64)
    words[:] = np.arange(len(words), dtype=np.uint64) * np.uint64(2654435761) + np.uint64(seed)

def digest(view):
    return hashlib.blake2b(view, digest_size=16).hexdigest()

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


def run(m: MachineClient, body: str, timeout: float = 120) -> Any:
    r = m.run([sys.executable, "-c", PRELUDE + body], timeout=timeout)
    assert r["status"] == 0, r["stderr"][-4000:]
    lines = r["stdout"].strip().splitlines()
    assert lines, r["stderr"][-4000:]
    return json.loads(lines[-1])
