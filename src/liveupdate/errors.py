"""The one exception root of the project.

Every error a user, a test or another kernel can see is a :class:`LiveUpdateError`: an errno
(the value a Linux kernel would return for the same failure) and a one-line message.
"""

from __future__ import annotations

import errno as _errno
import os


class LiveUpdateError(Exception):
    """An error with an errno and a one-line message.

    The constructors are keyword-only (``LiveUpdateError(err=errno.EINVAL, msg="...")``), so
    an errno and a message are never passed in the wrong order."""

    def __init__(self, *, err: int, msg: str) -> None:
        super().__init__(err, msg)
        self.errno = err
        self.message = msg

    @property
    def errno_name(self) -> str:
        return _errno.errorcode.get(self.errno, str(self.errno))

    def __str__(self) -> str:
        return f"{self.message} [{self.errno_name}: {os.strerror(self.errno)}]"

    @classmethod
    def from_os(cls, e: OSError) -> LiveUpdateError:
        """An OSError nobody expected (EMFILE, ENOSPC, EIO from the host), errno kept."""
        what = f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
        return cls(err=e.errno or _errno.EIO, msg=what)


class AbiError(LiveUpdateError):
    """Bytes that cross a kexec or the uAPI are malformed, or cannot be encoded.

    Every decoder in :mod:`liveupdate.abi` raises exactly this, whatever the input.
    """

    def __init__(self, *, msg: str, err: int = _errno.EINVAL) -> None:
        super().__init__(err=err, msg=msg)
