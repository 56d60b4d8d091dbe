"""The one service protocol of the userspace daemons (luod, the VMMs, the cache).

* :mod:`~liveupdate.ipc.fds` -- the one SCM_RIGHTS helper (every socket that carries fds:
  these services and the emulated kernel's syscall transport);
* :mod:`~liveupdate.ipc.framing` -- one record = one JSON object, fds beside it;
* :mod:`~liveupdate.ipc.envelope` -- the one reply envelope (errno by *name*);
* :mod:`~liveupdate.ipc.service` -- a request server as a handler table, and ``ask``;
* :mod:`~liveupdate.ipc.endpoints` -- where the services listen, luod's protocol version.

It imports nothing above :mod:`liveupdate.errors`: the emulated kernel uses :mod:`fds` too.
"""
