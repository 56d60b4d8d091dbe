"""The adoption of a userspace spare (ARCHITECTURE.md, "Spares"): the words a kernel and the
spare template (:mod:`liveupdate.userspace.spare`) exchange, in one place for both sides.

The kernel asks the template, over a SOCK_SEQPACKET control socket, for a spare
(:data:`ASK`); the answer is ``{"pid": N}`` with the kernel's end of the spare's adoption
channel beside it (SCM_RIGHTS), or ``{"errno", "message"}``. Adopting it is one record on that
channel: :func:`adoption` (argv, environment, working directory) with :data:`ADOPT_FDS` fds
-- stdin, stdout, stderr and the syscall connection, which the program finds at
:data:`SYSCALL_AT` --, answered with :data:`ADOPTED` once the spare holds them (as a started
process holds its fds when ``exec`` returns). Our own protocol: Linux has no spares.
"""

from __future__ import annotations

import json
import os
from typing import Any

TEMPLATE_MODULE = "liveupdate.userspace.spare"
ASK = b"spare"
ADOPTED = b"adopted"
ADOPT_FDS = 4  # stdin, stdout, stderr, the syscall connection
SYSCALL_AT = 3  # where an adopted program finds its syscall connection
MAX_RECORD = 1 << 16


def adoption(argv: list[str], env: dict[str, str], cwd: str) -> bytes:
    return json.dumps({"argv": argv, "env": env, "cwd": cwd}).encode()


def decode_adoption(raw: bytes) -> tuple[list[str], dict[str, str], str]:
    d: Any = json.loads(raw)
    argv, env, cwd = d["argv"], d["env"], d["cwd"]
    if not (isinstance(argv, list) and all(isinstance(a, str) for a in argv)
            and isinstance(env, dict) and isinstance(cwd, str)):
        raise ValueError("not an adoption")
    return argv, {str(k): str(v) for k, v in env.items()}, cwd


def runnable(argv: list[str], python: str) -> bool:
    """Whether a spare can run ``argv`` as the interpreter ``python`` would: that very
    interpreter with ``-m MODULE``, ``-c CODE`` or a script path."""
    if len(argv) < 2 or os.path.realpath(argv[0]) != os.path.realpath(python):
        return False
    if argv[1] in ("-m", "-c"):
        return len(argv) > 2
    return not argv[1].startswith("-")
