"""The sessions front end at the reboot (``liveupdate_reboot`` -> ``luo_session_serialize``):
freeze every file of every open session, in creation order and each file in preservation
order, then write the sessions in the plan's LUO format with the FLB node when the plan's FLB
format has one. All or nothing: a failure unfreezes everything already frozen, gives back
the pages this serialization allocated, and ``reboot()`` fails with the errno, the sessions
still usable."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from liveupdate.abi import generations, luo_session
from liveupdate.errors import AbiError, LiveUpdateError
from liveupdate.kernel.luo.files import FileSet
from liveupdate.kernel.luo.handler import out_compatible
from liveupdate.kernel.luo.handover import HANDOVERS

if TYPE_CHECKING:
    from liveupdate.kernel.luo.session import LuoSessions


def freeze(luo: LuoSessions, formats: dict[str, str]) -> None:
    done: list[FileSet] = []
    try:
        for s in luo.outgoing.values():
            assert s.files is not None
            s.files.freeze_all(formats)
            done.append(s.files)
        serialize(luo, formats)
    except (LiveUpdateError, AbiError) as e:
        for fs in reversed(done):
            fs.unfreeze_all()
        raise LiveUpdateError(err=e.errno, msg=f"LUO: freeze: {e.message}") from e
    luo.frozen = True
    luo.k.printk(f"luo: froze {len(luo.outgoing)} sessions")


def serialize(luo: LuoSessions, formats: dict[str, str]) -> None:
    """Each file named by its handler's format in this handover (the agreed one)."""
    luo.release_serialized()
    flb = formats.get("flb") in generations.FLB_NODE and luo.has_flb
    try:
        sessions = [(s.name, [luo_session.FileSer(out_compatible(e.handler, formats),
                                                  e.data, e.token) for e in (s.files or [])])
                    for s in luo.outgoing.values()]
        if flb:
            luo.k.write(luo.flb_header, luo_session.encode_flbs(luo.flbs.serialize()))
        HANDOVERS[formats["luo"]].serialize(luo, sessions, flb)
    except (LiveUpdateError, AbiError):
        luo.release_serialized()
        raise


def check_limits(luo: LuoSessions, luo_format: str, what: str) -> None:
    """EINVAL when the outgoing sessions do not fit ``luo_format``'s arrays (negotiated
    down to ``luo-v1``: checked at the load and at ``reboot()``)."""
    h = HANDOVERS[luo_format]
    if h.session_max is not None and len(luo.outgoing) > h.session_max:
        raise LiveUpdateError(err=errno.EINVAL, msg=(
            f"{what}: negotiation: {len(luo.outgoing)} sessions, {luo_format} holds "
            f"{h.session_max}"))
    for s in luo.outgoing.values():
        if h.file_max is not None and len(s.files or []) > h.file_max:
            raise LiveUpdateError(err=errno.EINVAL, msg=(
                f"{what}: negotiation: session {s.name!r} holds {len(s.files or [])} "
                f"files, {luo_format} holds {h.file_max} per session"))
