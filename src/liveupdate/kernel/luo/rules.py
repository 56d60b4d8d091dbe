"""The uAPI behaviours of the sessions front end that changed between releases, one object
per rule set, named by a LUO generation row's ``rules`` (:data:`liveupdate.abi.generations.
LUO`). A generation that changes a behaviour adds a subclass here and names it in its row.

* **6.19/7.0** -- ``luo_preserve_file`` does not look for the file in other sessions: the same
  memfd can be preserved twice; a failed RETRIEVE_FD is simply retried.
* **7.1+** -- ``luo_preserve_file`` refuses a file already preserved in any session (EBUSY:
  ``xa_insert`` on the global ``luo_preserved_files``); ``luo_retrieve_file`` keeps a failure
  (``luo_file->retrieve_status``) and answers it again on every later RETRIEVE_FD.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

from liveupdate.errors import LiveUpdateError
from liveupdate.kernel.fs.file import File


class Rules619:
    def check_preserve(self, f: File, in_any_session: Callable[[File], bool]) -> None:
        """Before a file joins a session."""

    def retrieve_failed(self, errors: dict[int, LiveUpdateError], token: int,
                        e: LiveUpdateError) -> None:
        """A RETRIEVE_FD failed: 6.19 forgets it."""


class Rules71(Rules619):
    def check_preserve(self, f: File, in_any_session: Callable[[File], bool]) -> None:
        if in_any_session(f):
            raise LiveUpdateError(err=errno.EBUSY, msg="PRESERVE_FD: the file is already "
                                  "preserved in a session")

    def retrieve_failed(self, errors: dict[int, LiveUpdateError], token: int,
                        e: LiveUpdateError) -> None:
        errors[token] = e  # sticky: retrieve_status


RULES: dict[str, Rules619] = {"6.19": Rules619(), "7.1": Rules71()}
