"""Asking a VMM where its guest memory lies (its control socket's ``where``).

A guest on small folios spread over RAM has thousands of physical extents, more than one
reply record holds (:data:`liveupdate.ipc.framing.MAX_MESSAGE`): the VMM answers
:data:`WHERE_PIECE` of them from index ``from`` with their total, and :func:`where` asks
until it has them all.
"""

from __future__ import annotations

import errno
from typing import Any

from liveupdate.errors import LiveUpdateError
from liveupdate.ipc.service import ask

WHERE_PIECE = 1024  # RAM extents per reply: ~30 bytes each in JSON


def where(sock: str) -> dict[str, Any]:
    """A VMM's whole ``where``, its RAM extents asked for piece by piece."""
    got = ask(sock, "where")
    ram = list(got["ram"])
    while len(ram) < int(got.get("ram_total", len(ram))):
        piece = ask(sock, "where", **{"from": len(ram)})["ram"]
        if not piece:
            raise LiveUpdateError(err=errno.EIO, msg=f"{sock}: 'where' stopped short of "
                                  f"{got['ram_total']} extents at {len(ram)}")
        ram += piece
    return {**got, "ram": ram}
