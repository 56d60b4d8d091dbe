"""The machine's control socket: one handler table, dispatched by
:func:`liveupdate.abi.wire.dispatch` (which turns results and errors into the reply).

The RAM debug port (``ram_read``, ``ram_write``, and ``maps``: where each process's memfds
lie in RAM) and the console (``console``, ``wait``) answer host-side tools only: a peer
(SO_PEERCRED) that descends from this machine process -- a kernel process or any of its
userspace -- gets EPERM (the console is the host's serial port: a guest that could read it
back would carry state across the update; kernel/mountns.py also keeps this socket out of
a confined guest's sight).
"""

from __future__ import annotations

import errno
import os
import socket
import socketserver
import struct
import sys
import threading
from dataclasses import dataclass
from typing import TypeVar

from liveupdate import procs
from liveupdate.abi import wire
from liveupdate.abi.wire import Message, arg
from liveupdate.errors import AbiError, LiveUpdateError
from liveupdate.machine import protocol
from liveupdate.machine.devices import Bus
from liveupdate.machine.machine import Machine
from liveupdate.machine.ram import Ram
from liveupdate.machine.state import parse_states


def is_guest(pid: int) -> bool:
    """Whether ``pid`` descends from this machine process: one of its kernels or their
    userspace (kernels are subreapers, so daemons stay below them)."""
    me = os.getpid()
    for _ in range(4096):  # a parent chain is finite; bounded anyway
        if pid == me:
            return True
        if pid <= 1:
            return False
        fields = procs.stat_fields(f"/proc/{pid}/stat")
        if len(fields) < 2:
            return False
        pid = int(fields[1])
    return False


def serve(machine: Machine, ready_fd: int | None = None) -> None:
    """Answer the control socket until a ``shutdown`` request (or :meth:`Machine.stop`)."""

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            creds = self.request.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                            struct.calcsize("3i"))
            peer = Peer(machine, is_guest(struct.unpack("3i", creds)[0]))
            while True:
                try:
                    msg = protocol.recv(self.request)
                except (OSError, LiveUpdateError, AbiError):
                    return
                if msg is None:
                    return
                reply = wire.dispatch(CONTROL, peer, Message(*msg), server="machine",
                                      on_bug=_log_bug)
                try:
                    protocol.send(self.request, reply.header, reply.payload)
                except OSError:
                    return

    if os.path.exists(machine.socket_path):
        os.unlink(machine.socket_path)
    machine.server = socketserver.ThreadingUnixStreamServer(machine.socket_path, Handler)
    machine.server.daemon_threads = True
    if ready_fd is not None:
        os.write(ready_fd, b"ready\n")
        os.close(ready_fd)
    machine.server.serve_forever()


Part = TypeVar("Part")


@dataclass(frozen=True)
class Peer:
    """One control connection: the machine, and whether the peer is its own guest."""

    machine: Machine
    guest: bool


def _log_bug(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _powered(peer: Peer, what: str, part: Part | None) -> Part:
    """A part of the machine for a host-side debug port: EAGAIN while the power is off."""
    _host_only(peer, what)
    if part is None:
        raise LiveUpdateError(err=errno.EAGAIN, msg="machine is off")
    return part


def _ram(peer: Peer) -> Ram:
    return _powered(peer, "RAM debug port", peer.machine.ram)


def _status(p: Peer, m: Message) -> Message:
    return Message(p.machine.status())


def _power_on(p: Peer, m: Message) -> Message:
    p.machine.power_on(m.header)
    return Message(p.machine.status())


def _power_off(p: Peer, m: Message) -> Message:
    p.machine.power_off()
    return Message(p.machine.status())


def _power_cycle(p: Peer, m: Message) -> Message:
    config = {**p.machine.config, **{k: v for k, v in m.header.items() if k != "op"}}
    p.machine.power_off()
    p.machine.power_on(config)
    return Message(p.machine.status())


def _host_only(peer: Peer, what: str) -> None:
    if peer.guest:
        raise LiveUpdateError(err=errno.EPERM, msg=f"the {what} answers host-side tools only, "
                              "not the machine's own kernels or their userspace")


def _console(p: Peer, m: Message) -> Message:
    _host_only(p, "console")
    mc, off = p.machine, arg(m, "offset", int, 0)
    with mc.cond:
        _, text = mc.console.since(off)
        return Message({"end": mc.console.end}, text)


def _wait(p: Peer, m: Message) -> Message:
    _host_only(p, "console")
    return Message(p.machine.wait_console(arg(m, "pattern", str), arg(m, "offset", int, 0),
                                          arg(m, "timeout", float, 60.0)))


def _wait_state(p: Peer, m: Message) -> Message:
    return Message(p.machine.wait_state(parse_states(m.header.get("states")),
                                        arg(m, "timeout", float, 60.0)))


def _to_kernel(p: Peer, m: Message) -> Message:
    return Message(*p.machine.ask_kernel(m.header, arg(m, "timeout", float, 60.0) + 5))


def _maps(p: Peer, m: Message) -> Message:
    """Each process's memfds and their physical extents: host-side tools only (Linux shows
    PFNs in ``/proc/PID/pagemap`` to root alone)."""
    _ram(p)
    return _to_kernel(p, m)


def _ram_read(p: Peer, m: Message) -> Message:
    return Message({}, _ram(p).read(arg(m, "phys", int), arg(m, "size", int)))


def _ram_write(p: Peer, m: Message) -> Message:
    _ram(p).write(arg(m, "phys", int), m.payload)
    return Message({})


def _bus(p: Peer) -> Bus:
    return _powered(p, "device debug port", p.machine.bus)


def _device_wait(p: Peer, m: Message) -> Message:
    return Message(_bus(p).wait_sent(arg(m, "bdf", str), arg(m, "sent", int),
                                     arg(m, "timeout", float, 60.0)))


def _dma_log(p: Peer, m: Message) -> Message:
    return Message({}, _bus(p).dma_log(arg(m, "since", int, 0)))


def _shutdown(p: Peer, m: Message) -> Message:
    p.machine.power_off()
    threading.Thread(target=p.machine.stop, daemon=True).start()
    return Message({})


CONTROL: dict[str, wire.Handler[Peer]] = {
    "status": _status,
    "power_on": _power_on,
    "power_off": _power_off,
    "power_cycle": _power_cycle,
    "console": _console,
    "wait": _wait,
    "wait_state": _wait_state,
    "run": _to_kernel,
    "kho_status": _to_kernel,
    "maps": _maps,
    "debugfs": _to_kernel,
    "ram_read": _ram_read,
    "ram_write": _ram_write,
    "device_wait": _device_wait,
    "dma_log": _dma_log,
    "shutdown": _shutdown,
}
