"""Where the services listen, and the version of luod's client protocol
(docs/luod-protocol.md)."""

from __future__ import annotations

import os

LUOD_VERSION = 1  # the ``v`` of luod's hello; docs/luod-protocol.md says what each changed
SOCKET_ENV = "LUOD_SOCKET"
HOST_SOCKET = "/run/luod/luod.sock"


def socket_path(cmdline: str) -> str:
    """Where luod listens: ``$LUOD_SOCKET``; on the emulated machine the machine's run
    folder (``lu.run=`` on its kernel's command line: stable across kernels, unlike a
    kernel's per-boot folder); else :data:`HOST_SOCKET`."""
    env = os.environ.get(SOCKET_ENV)
    if env:
        return env
    return next((w[7:] + "/luod.sock" for w in cmdline.split() if w.startswith("lu.run=")),
                HOST_SOCKET)


def service_socket(cmdline: str, service: str) -> str:
    """A service's control socket beside luod's (the VMMs', the cache's)."""
    return os.path.join(os.path.dirname(socket_path(cmdline)), f"{service}.sock")
