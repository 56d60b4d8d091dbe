"""File-Lifecycle-Bound objects (``luo_flb.c``, 7.0+; spec/luo.md 3.2): state shared by every
preserved file of one handler, created by the first preserve and destroyed by the last
unpreserve, carried across the kexec in the ``luo-flb-v1`` header page (name, data, count).

In the next kernel an FLB is retrieved once, when its first file is retrieved or finished,
and finished when the last of its files is finished. ``liveupdate_register_flb`` attaches an
FLB to a handler; attaching the same name twice is EEXIST.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import Protocol

from liveupdate.abi import luo_session
from liveupdate.errors import LiveUpdateError


class FlbOps(Protocol):
    name: str

    def preserve(self) -> int: ...
    def unpreserve(self, data: int) -> None: ...
    def retrieve(self, data: int) -> None: ...
    def finish(self, data: int) -> None: ...


@dataclass(eq=False)
class Flb:
    ops: FlbOps
    handler: str  # the handler's compatible
    count: int = 0
    data: int = 0


@dataclass(eq=False)
class IncomingFlb:
    name: str
    data: int
    count: int
    retrieved: bool = False


@dataclass
class FlbRegistry:
    flbs: list[Flb] = field(default_factory=list)
    incoming: dict[str, IncomingFlb] = field(default_factory=dict)

    def register(self, handler: str, ops: FlbOps) -> None:
        if any(f.ops.name == ops.name for f in self.flbs):
            raise LiveUpdateError(err=errno.EEXIST, msg=f"FLB {ops.name} exists")
        self.flbs.append(Flb(ops, handler))

    def _of(self, handler: str) -> list[Flb]:
        return [f for f in self.flbs if f.handler == handler]

    def file_preserved(self, handler: str) -> None:
        done: list[Flb] = []
        try:
            for flb in self._of(handler):
                if flb.count == 0:
                    flb.data = flb.ops.preserve()
                flb.count += 1
                done.append(flb)
        except LiveUpdateError:
            for flb in reversed(done):
                self._drop(flb)
            raise

    def _drop(self, flb: Flb) -> None:
        flb.count -= 1
        if flb.count == 0:
            flb.ops.unpreserve(flb.data)
            flb.data = 0

    def file_unpreserved(self, handler: str) -> None:
        for flb in self._of(handler):
            self._drop(flb)

    def serialize(self) -> list[luo_session.FlbSer]:
        return [luo_session.FlbSer(f.ops.name, f.data, f.count) for f in self.flbs if f.count]

    # -- incoming -------------------------------------------------------------------------
    def file_retrieved(self, handler: str) -> None:
        for flb in self._of(handler):
            inc = self.incoming.get(flb.ops.name)
            if inc is not None and not inc.retrieved:
                flb.ops.retrieve(inc.data)
                inc.retrieved = True

    def file_finished(self, handler: str) -> None:
        for flb in self._of(handler):
            inc = self.incoming.get(flb.ops.name)
            if inc is None:
                continue
            if not inc.retrieved:
                flb.ops.retrieve(inc.data)
                inc.retrieved = True
            inc.count -= 1
            if inc.count <= 0:
                flb.ops.finish(inc.data)
                del self.incoming[flb.ops.name]
