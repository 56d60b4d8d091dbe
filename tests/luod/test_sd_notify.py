"""luod tells systemd it is ready (sd_notify) when NOTIFY_SOCKET is set."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from liveupdate.cli.luod import sd_notify


def test_ready_is_sent_to_notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                        ) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        sd_notify("READY=1")
        assert s.recv(64) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    sd_notify("READY=1")  # without systemd: nothing to do, and no error
