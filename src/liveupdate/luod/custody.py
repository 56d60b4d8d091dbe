"""Who holds the clients' files across the kexec: one custody object per kind of LUO uAPI,
chosen once from the kernel's uAPI generation (:func:`custody_for`), so that the rest of luod
never asks which generation it runs on.

* :class:`GlobalTokens` (the seed's v3 state machine) -- tokens are global and only luod has
  the device: clients send their fds to luod, which preserves them on their behalf under
  global tokens it maps from (client, client token), preserves its registry under
  :data:`REGISTRY_TOKEN` and sends ``SET_EVENT(PREPARE)``; CANCEL and FINISH are events.
* :class:`Sessions` (mainline, 6.19+) -- as Google's luo-agent, luod creates one session per
  client and hands it over; the client preserves its own fds into it (unless luod enforces
  quotas: then luod keeps the session and preserves for it, ``mediated``). luod's registry
  goes into its own session :data:`OWN_SESSION`. There is no CANCEL in that uAPI: closing a
  session is the abort path; FINISH is per session.
"""

from __future__ import annotations

import errno
import os
from abc import ABC, abstractmethod
from typing import Any

from liveupdate.abi.uapi import Event, State
from liveupdate.client.device import LiveUpdate, Session
from liveupdate.errors import LiveUpdateError
from liveupdate.luod.registry import ClientRecord
from liveupdate.luod.state import Phase

REGISTRY_TOKEN = 0x4C554F44_00000000  # "LUOD": v3 tokens are global
CLIENT_TOKEN_BASE = 0x4C554F44_00000001
OWN_SESSION = "luod"

Key = tuple[int, str]  # a client: (uid, name)


class Custody(ABC):
    mediated: bool  # luod preserves and retrieves on the clients' behalf
    fresh_each_update: bool  # what a client preserved is new each update (quota usage too)

    def __init__(self, dev: LiveUpdate) -> None:
        self.dev = dev

    @abstractmethod
    def previous_registry(self) -> int | None:
        """The previous kernel's luod registry memfd, retrieved; None on a fresh start."""

    def reclaim(self, records: dict[Key, ClientRecord]) -> str:
        """After the registry is adopted: take back what it says is held; an error or ""."""
        return ""

    def restore_hello(self, key: Key, rec: ClientRecord) -> tuple[dict[str, Any], list[int]]:
        """What a returning client's hello carries after the kexec."""
        return {}, []

    @abstractmethod
    def open_for(self, key: Key, rec: ClientRecord) -> tuple[int, ...]:
        """At prepare: what this client gets to preserve into (fds sent with the event)."""

    @abstractmethod
    def preserve_registry(self, fd: int) -> None:
        """After every client acknowledged prepare: the registry memfd goes too."""

    @abstractmethod
    def admit_preserve(self, key: Key, phase: Phase, busy: str) -> None:
        """EBUSY when a mediated ``preserve`` cannot be taken now."""

    @abstractmethod
    def preserve(self, key: Key, fd: int, token: int, records: dict[Key, ClientRecord]
                 ) -> int:
        """Preserve ``fd`` for the client under its ``token``; the token the kernel knows."""

    @abstractmethod
    def retrieve(self, key: Key, rec: ClientRecord | None, token: int, name: str,
                 phase: Phase) -> int:
        """After the kexec: the client's file of ``token`` (ENOENT: not theirs)."""

    @abstractmethod
    def cancel(self, records: dict[Key, ClientRecord]) -> None:
        """Nothing left preserved; the records forget what they held."""

    @abstractmethod
    def finish(self) -> None:
        """FINISH: what nobody claimed is freed."""


class GlobalTokens(Custody):
    mediated = True
    fresh_each_update = False

    def previous_registry(self) -> int | None:
        if self.dev.get_state() is not State.UPDATED:
            return None
        return self.dev.fd_restore(REGISTRY_TOKEN)

    def restore_hello(self, key: Key, rec: ClientRecord) -> tuple[dict[str, Any], list[int]]:
        return {"tokens": sorted(rec.tokens)}, []

    def open_for(self, key: Key, rec: ClientRecord) -> tuple[int, ...]:
        return ()

    def preserve_registry(self, fd: int) -> None:
        self.dev.fd_preserve(fd, REGISTRY_TOKEN)
        self.dev.set_event(Event.PREPARE)

    def admit_preserve(self, key: Key, phase: Phase, busy: str) -> None:
        if phase not in (Phase.NORMAL, Phase.UPDATED) and busy != "prepare":
            raise LiveUpdateError(err=errno.EBUSY, msg=f"luod is {phase.value}")

    def preserve(self, key: Key, fd: int, token: int, records: dict[Key, ClientRecord]
                 ) -> int:
        glob = 1 + max([CLIENT_TOKEN_BASE - 1, *(g for r in records.values()
                                                 for g in r.tokens.values())])
        self.dev.fd_preserve(fd, glob)
        return glob

    def retrieve(self, key: Key, rec: ClientRecord | None, token: int, name: str,
                 phase: Phase) -> int:
        if phase is not Phase.UPDATED or rec is None or token not in rec.tokens:
            raise LiveUpdateError(err=errno.ENOENT, msg=f"{name} has no preserved "
                                  f"token {token:#x}")
        return self.dev.fd_restore(rec.tokens[token])

    def cancel(self, records: dict[Key, ClientRecord]) -> None:
        if self.dev.get_state() in (State.PREPARED, State.FROZEN):
            self.dev.set_event(Event.CANCEL)
        for rec in records.values():
            for glob in rec.tokens.values():
                self._unpreserve_quietly(glob)
            rec.tokens.clear()
        self._unpreserve_quietly(REGISTRY_TOKEN)

    def _unpreserve_quietly(self, token: int) -> None:
        """FD_UNPRESERVE where the token may already be gone (ENOENT is fine)."""
        try:
            self.dev.fd_unpreserve(token)
        except LiveUpdateError as e:
            if e.errno != errno.ENOENT:
                raise

    def finish(self) -> None:
        self.dev.set_event(Event.FINISH)


class Sessions(Custody):
    fresh_each_update = True

    def __init__(self, dev: LiveUpdate, mediated: bool) -> None:
        super().__init__(dev)
        self.mediated = mediated
        self.out: dict[Key, Session] = {}  # this update's, one per client
        self.incoming: dict[Key, Session] = {}  # the previous kernel's, retrieved
        self.own: Session | None = None  # luod's own: its registry

    def previous_registry(self) -> int | None:
        try:
            self.own = self.dev.retrieve_session(OWN_SESSION)
        except LiveUpdateError as e:
            if e.errno != errno.ENOENT:
                raise
            return None
        return self.own.retrieve_fd(0)

    def reclaim(self, records: dict[Key, ClientRecord]) -> str:
        error = ""
        for key, rec in records.items():
            if rec.session:
                try:
                    self.incoming[key] = self.dev.retrieve_session(rec.session)
                except LiveUpdateError as err:
                    error = f"session {rec.session}: {err.message}"
        return error

    def restore_hello(self, key: Key, rec: ClientRecord) -> tuple[dict[str, Any], list[int]]:
        if key in self.incoming and not self.mediated:
            return {}, [os.dup(self.incoming[key].fd)]
        return {}, []

    def open_for(self, key: Key, rec: ClientRecord) -> tuple[int, ...]:
        name = f"{key[0]}:{key[1]}"
        self.out[key] = self.dev.create_session(name)
        rec.session = name
        return () if self.mediated else (self.out[key].fd,)

    def preserve_registry(self, fd: int) -> None:
        self.own = self.dev.create_session(OWN_SESSION)
        self.own.preserve_fd(fd, 0)

    def admit_preserve(self, key: Key, phase: Phase, busy: str) -> None:
        if busy != "prepare" or key not in self.out:
            raise LiveUpdateError(err=errno.EBUSY, msg="preserve inside prepare")

    def preserve(self, key: Key, fd: int, token: int, records: dict[Key, ClientRecord]
                 ) -> int:
        self.out[key].preserve_fd(fd, token)
        return token

    def retrieve(self, key: Key, rec: ClientRecord | None, token: int, name: str,
                 phase: Phase) -> int:
        session = self.incoming.get(key)
        if phase is not Phase.UPDATED or session is None:
            raise LiveUpdateError(err=errno.ENOENT, msg=f"{name} has nothing from "
                                  "the previous kernel")
        return session.retrieve_fd(token)

    def cancel(self, records: dict[Key, ClientRecord]) -> None:
        for s in [*self.out.values(), *([self.own] if self.own else [])]:
            s.close()  # the abort path: closing a session unpreserves it
        self.out.clear()
        self.own = None
        for rec in records.values():
            rec.session = ""
            rec.tokens.clear()

    def finish(self) -> None:
        for s in [*self.incoming.values(), *([self.own] if self.own else [])]:
            s.finish()
            s.close()
        self.incoming.clear()
        self.own = None


def custody_for(dev: LiveUpdate, quotas: bool) -> Custody:
    """The custody of the kernel's uAPI (asked once, of its generation object). ``quotas``:
    luod enforces per-client quotas, so on 6.19+ it keeps the sessions to itself (a client
    holding its own session fd could preserve past any quota)."""
    return Sessions(dev, mediated=quotas) if dev.gen.sessions else GlobalTokens(dev)
