"""A planted bug, run as a VMM: ``python copying_vmm.py NAME --memory SIZE --accel tcg``.

It is :mod:`liveupdate.vmm` except that after an update it restores by copying: it retrieves
the preserved guest memfd, copies every byte into a fresh memfd and runs the guest on that.
The guest cannot tell (its bytes are all there, so its own check says intact); the zero-copy
witness must (:mod:`liveupdate.scenario.witness`)."""

from __future__ import annotations

import os
import sys
from typing import Any

import liveupdate.vmm.__main__ as vmm_main
from liveupdate.vmm import vmm

PIECE = 1 << 20


class CopyingVmm(vmm.Vmm):
    def _connect(self) -> Any:
        client = super()._connect()
        retrieve = client.retrieve

        def copying_retrieve(token: int) -> int:
            fd: int = retrieve(token)
            if token != vmm.RAM_TOKEN:
                return fd
            fresh = self.backend.memfd_create(f"vm-{self.name}")
            self.backend.ftruncate(fresh, self.size)
            src, dst = self.backend.map(fd, self.size), self.backend.map(fresh, self.size)
            for off in range(0, self.size, PIECE):
                dst.view[off : off + PIECE] = src.view[off : off + PIECE]
            src.close()
            dst.close()
            os.close(fd)
            return fresh

        client.retrieve = copying_retrieve
        return client


if __name__ == "__main__":
    vmm_main.Vmm = CopyingVmm  # type: ignore[misc]
    sys.exit(vmm_main.main())
