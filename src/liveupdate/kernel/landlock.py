"""Landlock (Documentation/userspace-api/landlock.rst), the few calls :mod:`.confine` needs.

``landlock_create_ruleset``, ``landlock_add_rule`` (``LANDLOCK_RULE_PATH_BENEATH``) and
``landlock_restrict_self`` through ``syscall(2)``: a domain restricts the calling thread and
every process it starts from then on, and cannot be lifted. The structs are the uAPI's
(``landlock_ruleset_attr`` grows with the ABI: fs, net (4), scoped (6); the path-beneath
attribute is packed, 12 bytes).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446  # x86_64
CREATE_RULESET_VERSION = 1
RULE_PATH_BENEATH = 1
PR_SET_NO_NEW_PRIVS = 38

WRITE_FILE, REMOVE_DIR, REMOVE_FILE = 1 << 1, 1 << 4, 1 << 5
MAKE_CHAR, MAKE_DIR, MAKE_REG, MAKE_SOCK = 1 << 6, 1 << 7, 1 << 8, 1 << 9
MAKE_FIFO, MAKE_BLOCK, MAKE_SYM, REFER, TRUNCATE = 1 << 10, 1 << 11, 1 << 12, 1 << 13, 1 << 14
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def _call(libc: ctypes.CDLL, *args: object) -> int:
    r = int(libc.syscall(*args))
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


def abi_version() -> int:
    """The running kernel's Landlock ABI, 0 when it has none (or it is disabled)."""
    try:
        return _call(_libc(), SYS_CREATE_RULESET, None, ctypes.c_size_t(0),
                     ctypes.c_uint32(CREATE_RULESET_VERSION))
    except OSError as e:
        if e.errno in (errno.ENOSYS, errno.EOPNOTSUPP):
            return 0
        raise


def writes(abi: int) -> int:
    """Every access that changes the filesystem, as far as this ABI knows them."""
    acc = (WRITE_FILE | REMOVE_DIR | REMOVE_FILE | MAKE_CHAR | MAKE_DIR | MAKE_REG | MAKE_SOCK
           | MAKE_FIFO | MAKE_BLOCK | MAKE_SYM)
    return acc | (REFER if abi >= 2 else 0) | (TRUNCATE if abi >= 3 else 0)


def restrict_self(abi: int, rules: list[tuple[str, int]]) -> None:
    """Deny every filesystem change except ``rules`` (path, accesses beneath it), every TCP
    bind and connect (ABI 4+), and (ABI 6+) abstract unix sockets and signals outside the
    domain -- for this thread and all it starts. Reading stays free."""
    libc = _libc()
    handled = writes(abi)
    attr = struct.pack("=Q", handled)
    if abi >= 4:
        attr += struct.pack("=Q", NET_BIND_TCP | NET_CONNECT_TCP)
    if abi >= 6:
        attr += struct.pack("=Q", SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL)
    buf = ctypes.create_string_buffer(attr, len(attr))
    ruleset = _call(libc, SYS_CREATE_RULESET, buf, ctypes.c_size_t(len(attr)),
                    ctypes.c_uint32(0))
    try:
        for path, access in rules:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = ctypes.create_string_buffer(struct.pack("=Qi", access & handled, fd), 12)
                _call(libc, SYS_ADD_RULE, ctypes.c_int(ruleset),
                      ctypes.c_int(RULE_PATH_BENEATH), rule, ctypes.c_uint32(0))
            finally:
                os.close(fd)
        try:
            _call(libc, SYS_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0))
        except OSError as e:  # without CAP_SYS_ADMIN Landlock wants no_new_privs
            if e.errno != errno.EPERM:
                raise
            _call(libc, 157, ctypes.c_int(PR_SET_NO_NEW_PRIVS), ctypes.c_ulong(1),
                  ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))  # prctl
            _call(libc, SYS_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0))
    finally:
        os.close(ruleset)
