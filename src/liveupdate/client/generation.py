"""Which LUO uAPI a kernel speaks, from its release string (``uname -r``), never by probing
ioctls: 0xBA00 has side effects in every generation (spec/luo.md 8).

Mainline has LUO from 6.19 (sessions); 7.1 added GET_NAME. The seed's state-machine uAPI
("v3") never shipped in a release: kernels that carry it say so with a ``-v3`` suffix (our
v3 images report ``6.17.0-lu-v3``). Anything else before 6.19 has no LUO.
"""

from __future__ import annotations

import errno
import re

from liveupdate.abi.uapi import Gen
from liveupdate.errors import LiveUpdateError

_RELEASE = re.compile(r"^(\d+)\.(\d+)")


def generation_of(release: str) -> Gen:
    if re.search(r"-v3(\b|$)", release):
        return Gen.V3
    m = _RELEASE.match(release)
    if m is None:
        raise LiveUpdateError(err=errno.EINVAL, msg=f"kernel release {release!r} is not "
                              "MAJOR.MINOR...")
    version = (int(m.group(1)), int(m.group(2)))
    if version >= (7, 1):
        return Gen.V7_1
    if version >= (6, 19):
        return Gen.V6_19
    raise LiveUpdateError(err=errno.EOPNOTSUPP, msg=f"kernel {release} has no LUO "
                          "(mainline LUO starts at 6.19)")


def kernel_generation(release: str) -> str:
    """The handover generation (``abi.generations.RELEASES``) a release string stands for:
    what luod assumes a kernel writes and reads when no image header says more. 6.17 is
    counted with 6.16 (512-byte bitmaps, unless the stable fix was backported)."""
    if re.search(r"-v3(\b|$)", release):
        return "v3"
    m = _RELEASE.match(release)
    if m is None:
        raise LiveUpdateError(err=errno.EINVAL, msg=f"kernel release {release!r} is not "
                              "MAJOR.MINOR...")
    version = (int(m.group(1)), int(m.group(2)))
    for floor, gen in (((7, 2), "7.2"), ((7, 1), "7.1"), ((7, 0), "7.0"), ((6, 19), "6.19"),
                       ((6, 18), "6.18")):
        if version >= floor:
            return gen
    return "6.16"
