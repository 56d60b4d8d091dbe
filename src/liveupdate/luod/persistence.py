"""What luod keeps, and where: the registry in a memfd that LUO carries across the kexec
(never on disk: it can never go stale), and a ``/run``-like state file that explains to a
luod restarted by init, in the same boot, how its predecessor ended."""

from __future__ import annotations

import json
import os
from typing import Any

from liveupdate import jsonfile
from liveupdate.client.backends import Backend
from liveupdate.errors import AbiError
from liveupdate.luod import registry


class Persistence:
    def __init__(self, backend: Backend, path: str, boot_id: str, generation: str) -> None:
        self.backend = backend
        self.state_file = path + ".state"
        self.boot_id = boot_id
        self.reg = registry.Registry(generation)
        self.fd = backend.memfd_create("luod-registry")  # preserved at prepare
        backend.ftruncate(self.fd, registry.SIZE)
        self.map = backend.map(self.fd, registry.SIZE)

    # -- the registry memfd ---------------------------------------------------------------
    def write(self, records: list[registry.ClientRecord]) -> None:
        self.reg.clients = records
        self.map.view[: registry.SIZE] = self.reg.encode()

    def adopt(self, fd: int) -> str:
        """Take the previous luod's registry from its (retrieved) memfd, and close it. An
        unreadable one is replaced by an empty registry: the error to report, or ""."""
        m = self.backend.map(fd, registry.SIZE)
        why = ""
        try:
            self.reg = registry.decode(bytes(m.view))
        except AbiError as e:
            why = f"the previous luod's registry is unreadable ({e.message}); " \
                  "unclaimed resources are reclaimed at FINISH"
            self.reg = registry.Registry(self.reg.generation)
        finally:
            m.close()
            os.close(fd)
        return why

    # -- the state file -------------------------------------------------------------------
    def read_state(self) -> dict[str, Any]:
        """A previous luod's state in *this* boot (like /run, it means nothing to a later
        boot: after a kexec the registry says what happened, after a power loss nothing)."""
        try:
            with open(self.state_file) as f:
                d = json.load(f)
        except (OSError, ValueError):
            return {}
        return d if isinstance(d, dict) and d.get("boot_id") == self.boot_id else {}

    def save_state(self, phase: str, error: str) -> None:
        """Runtime state for a luod restarted by init (``/run``-like, not the registry)."""
        try:
            os.makedirs(os.path.dirname(self.state_file) or ".", exist_ok=True)
            jsonfile.dump(self.state_file, {"phase": phase, "error": error,
                                            "boot_id": self.boot_id})
        except OSError as e:  # only a restarted luod's explanation is lost
            print(f"luod: cannot save {self.state_file}: {e.strerror}", flush=True)
