"""Which Unix socket is connected to which: the kernel's sock_diag (NETLINK_SOCK_DIAG with
UNIX_DIAG, as ``ss -x`` uses), so tests can prove who holds the other end of a socket."""

from __future__ import annotations

import socket
import struct

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_DONE, NLMSG_ERROR = 3, 2
UDIAG_SHOW_PEER = 0x4
UNIX_DIAG_PEER = 2
_NLMSGHDR = struct.Struct("=IHHII")
_REQ = struct.Struct("=BBHIIIII")  # family, protocol, pad, states, ino, show, cookie[2]
_MSG = struct.Struct("=BBBBIII")  # family, type, state, pad, ino, cookie[2]


def unix_peers() -> dict[int, int]:
    """Socket inode -> its peer's inode, for every connected Unix socket on the host."""
    req = _REQ.pack(socket.AF_UNIX, 0, 0, 0xFFFFFFFF, 0, UDIAG_SHOW_PEER, 0, 0)
    hdr = _NLMSGHDR.pack(_NLMSGHDR.size + len(req), SOCK_DIAG_BY_FAMILY,
                         NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
    peers: dict[int, int] = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as s:
        s.sendto(hdr + req, (0, 0))
        while True:
            data = s.recv(1 << 20)
            off = 0
            while off + _NLMSGHDR.size <= len(data):
                length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, off)
                if kind == NLMSG_DONE:
                    return peers
                if kind == NLMSG_ERROR:
                    raise OSError("sock_diag refused the UNIX_DIAG dump")
                body = data[off + _NLMSGHDR.size : off + length]
                ino = _MSG.unpack_from(body)[4]
                attr = _MSG.size
                while attr + 4 <= len(body):
                    alen, atype = struct.unpack_from("=HH", body, attr)
                    if alen < 4:
                        break
                    if atype == UNIX_DIAG_PEER:
                        peers[ino] = struct.unpack_from("=I", body, attr + 4)[0]
                    attr += (alen + 3) & ~3
                off += (length + 3) & ~3
