"""What starts often, or inside a VM's blackout, is kept lean: after a kexec the next
kernel's luod is a fresh Python process the VMMs wait for, and ``luoctl status`` is what
scripts poll; neither may bring the heavy libraries that the image parsers, the emulator or
the report renderer need (numpy alone is ~100 ms of import on this machine)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(("module", "then", "heavy"), [
    ("liveupdate.cli.luod", "", ("numpy", "rich", "unicorn", "click")),
    ("liveupdate.vmm.__main__", "", ("unicorn", "rich", "click")),  # on KVM: no TCG
    ("liveupdate.cli.luoctl", "m.main.get_command(None, 'status')", ("numpy", "unicorn")),
])
def test_what_starts_often_imports_nothing_heavy(module: str, then: str,
                                                 heavy: tuple[str, ...]) -> None:
    probe = (f"import sys, importlib; m = importlib.import_module({module!r}); {then or 0}; "
             f"print(' '.join(h for h in {heavy!r} if h in sys.modules))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                       timeout=60, check=True)
    assert r.stdout.strip() == "", f"{module} imports {r.stdout.strip()}"
