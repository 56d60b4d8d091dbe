"""The collection's documentation parses as Ansible reads it (``ansible-doc``): the module's
options, examples and return values -- the real-host actions ``start`` and ``wait`` among
them -- and the role's argument specification. A colon in a plain YAML scalar is enough to
make ``ansible-doc`` refuse the whole module, so this is checked, not assumed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def ansible_doc(*args: str) -> dict[str, Any]:
    env = {**os.environ, "ANSIBLE_COLLECTIONS_PATH": os.environ.get(
        "ANSIBLE_COLLECTIONS_PATH", str(ROOT / ".venv/share/ansible/collections"))}
    r = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ansible-doc"),
                        "--json", *args], capture_output=True, text=True, timeout=120,
                       env=env)
    assert r.returncode == 0 and "ERROR" not in r.stderr, r.stderr
    got: dict[str, Any] = json.loads(r.stdout)
    return got


def test_the_module_documents_the_real_host_actions() -> None:
    doc = ansible_doc("liveupdate.fleet.luoctl_host")["liveupdate.fleet.luoctl_host"]
    opts = doc["doc"]["options"]
    assert opts["action"]["choices"] == ["update", "start", "wait", "status", "verify"]
    for o in ("image", "state_dir", "socket", "update", "timeout"):
        assert opts[o]["description"], o
    ret = doc["return"]
    for r in ("number", "pid", "log", "record", "handover", "boot_id", "vms", "gate"):
        assert "start" in ret[r]["returned"] or "wait" in ret[r]["returned"], r
    assert "action: wait" in doc["examples"]


def test_the_role_documents_its_real_host_variables() -> None:
    doc = ansible_doc("-t", "role", "liveupdate.fleet.live_update")
    opts = doc["liveupdate.fleet.live_update"]["entry_points"]["main"]["options"]
    for v in ("lu_real_host", "lu_image", "lu_state_dir", "lu_reconnect_delay",
              "lu_reconnect_timeout", "lu_wait_timeout", "lu_luod_socket"):
        assert opts[v]["description"], v
    assert not opts["lu_fleet"].get("required")
