"""luod's framing when fds do not all arrive: the sender's fault or luod's own shortage."""

from __future__ import annotations

import json
import subprocess
import sys

PROG = r'''
import json, os, resource, socket
from liveupdate.errors import LiveUpdateError
from liveupdate.ipc import framing

a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
spare = [os.dup(0) for _ in range(4)]
out = {}
open_now = len(os.listdir("/proc/self/fd"))
resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + 1, resource.getrlimit(
    resource.RLIMIT_NOFILE)[1]))  # room for the listdir fd and one received fd
framing.send(a, {"op": "hello"}, spare)
try:
    framing.recv(b)
    out["short"] = "ok"
except LiveUpdateError as e:
    out["short"] = [e.errno_name, e.message]
resource.setrlimit(resource.RLIMIT_NOFILE, (1024, resource.getrlimit(
    resource.RLIMIT_NOFILE)[1]))
many = [os.dup(0) for _ in range(framing.MAX_FDS + 2)]
framing.send(a, {"op": "hello"}, many)  # more than luod takes: the sender's fault
try:
    framing.recv(b)
    out["many"] = "ok"
except LiveUpdateError as e:
    out["many"] = [e.errno_name, e.message]
print(json.dumps(out))
'''


def test_running_out_of_fds_is_emfile_and_too_many_is_eproto() -> None:
    r = subprocess.run([sys.executable, "-c", PROG], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["short"][0] == "EMFILE" and "no free file descriptor" in got["short"][1]
    assert got["many"][0] == "EPROTO" and "too large" in got["many"][1]
