"""Which LUO uAPI a kernel speaks, from its release string (``uname -r``), never by probing
ioctls: 0xBA00 has side effects in every generation (spec/luo.md 8). The rules are the one
table :data:`liveupdate.abi.uapi_generation.RELEASES`; the answer is a
:class:`~liveupdate.abi.uapi_generation.UapiGeneration` that userspace asks (``sessions``,
``get_name``) instead of comparing generation names.
"""

from __future__ import annotations

from liveupdate.abi.uapi_generation import UapiGeneration, release_of, uapi_of


def generation_of(release: str) -> UapiGeneration:
    """The uAPI of the kernel that reports ``release``; EOPNOTSUPP without LUO, EINVAL for a
    release that is not MAJOR.MINOR..."""
    return uapi_of(release)


def kernel_generation(release: str) -> str:
    """The handover generation (``abi.generations.RELEASES``) a release string stands for:
    what luod assumes a kernel writes and reads when no image header says more."""
    return release_of(release).handover
