"""Ansible connection ``kexec_local``, for tests: ``local`` with a real host's one property
that matters across a live update -- a command that started in one kernel does not finish
in the next. The emulated machine (``$LU_KEXEC_MACHINE``) counts its boots; when the count
moved while a command ran, the command's process and the connection would have died with
the old kernel on a real host, so its output is thrown away and the host is unreachable
(``AnsibleConnectionFailure``), as SSH would report it. The next command reaches the next
kernel."""

from __future__ import annotations

import os

from ansible.errors import AnsibleConnectionFailure
from ansible.plugins.connection.local import Connection as Local

from liveupdate.errors import LiveUpdateError
from liveupdate.machine.client import MachineClient

DOCUMENTATION = """
    name: kexec_local
    short_description: local, but a kexec during a command drops the connection
    description:
        - Runs commands on the controller; a command during which the emulated machine
          named by C(LU_KEXEC_MACHINE) booted another kernel fails as unreachable.
    author: liveupdate
    options:
        become_success_timeout:
            type: int
            default: 10
            description: As for C(local).
            vars:
                - name: ansible_local_become_success_timeout
        become_strip_preamble:
            type: bool
            default: true
            description: As for C(local).
            vars:
                - name: ansible_local_become_strip_preamble
    extends_documentation_fragment:
        - connection_pipelining
"""


def boots() -> int | None:
    """The machine's boot count; None while it does not answer."""
    try:
        m = MachineClient(os.environ["LU_KEXEC_MACHINE"])
    except LiveUpdateError:
        return None
    try:
        return int(m.status()["boot_count"])
    finally:
        m.close()


class Connection(Local):
    transport = "kexec_local"

    def exec_command(self, cmd: str, in_data: bytes | None = None,
                     sudoable: bool = True) -> tuple[int, bytes, bytes]:
        before = boots()
        got = super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
        after = boots()
        if before is None or after != before:
            raise AnsibleConnectionFailure(
                f"the host booted another kernel (boot {before} -> {after}) while the "
                "command ran: the connection died with the old one")
        return got
