"""What userspace needs to know about a kernel's LUO uAPI: one frozen object per
:class:`~liveupdate.abi.uapi.Gen`, chosen once from the release string (``uname -r``) by the
one table :data:`RELEASES` -- never by probing ioctls: 0xBA00 has side effects in every
generation (spec/luo.md 8).

Userspace (luod, the client library, the keeper programs) runs on a real kernel too, so it
may not import the emulated kernel's generation objects; it asks these instead of comparing
generation names: :attr:`UapiGeneration.sessions` (mainline's sessions, or the seed's one
global state machine with global tokens), :attr:`UapiGeneration.state_machine` (GET_STATE /
SET_EVENT: PREPARE, FREEZE, FINISH, CANCEL), :attr:`UapiGeneration.get_name`, and
:meth:`UapiGeneration.ioctl` (the uAPI table's entry, ENOTTY/EOPNOTSUPP when absent).

Mainline has LUO from 6.19 (sessions); 7.1 added GET_NAME. Generations that never shipped
as a release say so with a suffix, which beats the number: the seed's state-machine uAPI
(our v3 images report ``6.17.0-lu-v3``) and 7.3 with the posted series (``7.3.0-lu-posted``).
Anything else before 6.19 has no LUO.
"""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass

from liveupdate.abi import generations, uapi
from liveupdate.abi.uapi import Gen
from liveupdate.errors import LiveUpdateError


@dataclass(frozen=True)
class UapiGeneration:
    gen: Gen
    sessions: bool  # sessions (mainline) -- else one global state machine, global tokens
    get_name: bool  # SESSION_GET_NAME (7.1+)
    state_machine: bool  # GET_STATE/SET_EVENT on /dev/liveupdate (the posted v3, v4)

    def __str__(self) -> str:
        return str(self.gen)

    def ioctl(self, name: str) -> uapi.Ioctl:
        """The uAPI table's entry of ``name`` (AbiError ENOTTY when this uAPI has none)."""
        return uapi.ioctl(self.gen, name)

    def entry_for(self, cmd: int) -> uapi.Ioctl | None:
        """The entry whose number is exactly ``cmd`` (userspace fd translation)."""
        return uapi.entry_for(self.gen, cmd)

    def need(self, sessions: bool, what: str) -> None:
        """EOPNOTSUPP unless this uAPI is of the asked kind."""
        if self.sessions != sessions:
            raise LiveUpdateError(err=errno.EOPNOTSUPP, msg=f"{what}: not in the LUO "
                                  f"{self.gen} uAPI")


V3 = UapiGeneration(Gen.V3, sessions=False, get_name=False, state_machine=True)
V4 = UapiGeneration(Gen.V4, sessions=True, get_name=False, state_machine=True)  # posted only
V6_19 = UapiGeneration(Gen.V6_19, sessions=True, get_name=False, state_machine=False)
V7_1 = UapiGeneration(Gen.V7_1, sessions=True, get_name=True, state_machine=False)
ALL = (V3, V4, V6_19, V7_1)
BY_GEN = {u.gen: u for u in ALL}



def named(name: str) -> UapiGeneration:
    """The object of a generation name as luod reports it (``"6.19"``); EINVAL otherwise."""
    try:
        return BY_GEN[Gen(name)]
    except ValueError:
        raise LiveUpdateError(err=errno.EINVAL, msg=f"no LUO uAPI generation {name!r}") \
            from None


_RELEASE = re.compile(r"^(\d+)\.(\d+)")
_LOCAL = "-lu"  # our images' local version; what follows it names an unreleased generation


@dataclass(frozen=True)
class Release:
    """A release floor: from ``floor`` on, the kernel writes and reads the handover
    generation ``handover`` (``abi.generations.RELEASES``) and speaks ``uapi`` (None: no
    LUO)."""

    floor: tuple[int, int]
    handover: str
    uapi: UapiGeneration | None


def _version(release: str) -> tuple[int, int] | None:
    m = _RELEASE.match(release)
    return None if m is None else (int(m.group(1)), int(m.group(2)))


def _suffix(release: str) -> str:
    """``-v3`` of ``6.17.0-lu-v3``; "" for a mainline generation's ``7.3.0-lu``."""
    _, _, tail = release.partition(_LOCAL)
    return tail


def _uapi(name: str) -> UapiGeneration | None:
    u = generations.LUO[generations.RELEASES[name].luo].uapi
    return BY_GEN[Gen(u)] if u else None


def _releases() -> tuple[Release, ...]:
    """The release-string rules, newest first, from the generation table
    (:data:`liveupdate.abi.generations.RELEASES`): each mainline generation from its release
    on, the oldest from (0, 0) -- 6.17 is counted with 6.16 (512-byte bitmaps, unless the
    stable fix was backported)."""
    rows = sorted(((v, name) for name, r in generations.RELEASES.items()
                   if not _suffix(r.release) and (v := _version(r.release))), reverse=True)
    return tuple(Release(v if i < len(rows) - 1 else (0, 0), name, _uapi(name))
                 for i, (v, name) in enumerate(rows))


RELEASES = _releases()
# the unreleased generations, by the suffix their release strings carry
SUFFIXED = {re.compile(re.escape(sfx) + r"(\b|$)"): Release((0, 0), name, _uapi(name))
            for name, r in generations.RELEASES.items() if (sfx := _suffix(r.release))}


def release_of(release: str) -> Release:
    """The row of :data:`RELEASES` a release string falls in (EINVAL when it is not
    ``MAJOR.MINOR...``)."""
    for suffix, row in SUFFIXED.items():
        if suffix.search(release):
            return row
    m = _RELEASE.match(release)
    if m is None:
        raise LiveUpdateError(err=errno.EINVAL, msg=f"kernel release {release!r} is not "
                              "MAJOR.MINOR...")
    version = (int(m.group(1)), int(m.group(2)))
    return next(r for r in RELEASES if version >= r.floor)


def uapi_of(release: str) -> UapiGeneration:
    """The uAPI a kernel of ``release`` speaks; EOPNOTSUPP when it has no LUO."""
    row = release_of(release)
    if row.uapi is None:
        raise LiveUpdateError(err=errno.EOPNOTSUPP, msg=f"kernel {release} has no LUO "
                              "(mainline LUO starts at 6.19)")
    return row.uapi
