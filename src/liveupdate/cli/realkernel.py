"""``luoctl realkernel``: build, boot and test a real Linux 7.3 with KHO and LUO."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import click

from liveupdate.cli.common import emit, fail
from liveupdate.errors import LiveUpdateError
from liveupdate.realkernel.build import SELFTESTS

# what the harness can meet from the host (a tool, a file, a child process) besides its own
# errors: reported in one line like them, never as a traceback
ERRORS = (LiveUpdateError, OSError, subprocess.SubprocessError, ValueError)

OUT = Path(".realkernel")


@click.group()
def realkernel() -> None:
    """The real kernel as a tool: Linux 7.3 from Debian's linux-source-7.3, built with KHO
    and LUO, booted under QEMU (TCG) through virtme-ng with this repository's .venv inside.

    Needs Debian's qemu-system-x86 and a kernel toolchain (gcc, make, flex, bison, bc,
    libelf-dev, libssl-dev): installed with apt-get when run as root, else named in the
    error. virtme-ng comes with the project's [realkernel] extra. The image is cached in
    $LIVEUPDATE_REALKERNEL_CACHE (default ~/.cache/liveupdate/realkernel), keyed by kernel
    version and config fragment: the first build takes 6-10 minutes on 2 cores, later runs
    start in seconds.

    \b
    Examples:
      luoctl realkernel build
      luoctl realkernel selftests
      luoctl realkernel run -- uname -a
      luoctl realkernel capture --out /tmp/cap
      luoctl inspect --ram /tmp/cap/ram.elf /tmp/cap/setup_data.payload
    """


def _image(version: str | None = None, jobs: int | None = None) -> Any:
    from liveupdate.realkernel.build import build

    return build(version=version, jobs=jobs)


@realkernel.command("build")
@click.option("--version", "version", default=None,
              help="Debian version of linux-source-7.3, e.g. 7.3.4-1~bpo13+1 [default: the "
                   "newest offered].")
@click.option("--jobs", "-j", type=click.IntRange(1, 256), default=None,
              help="make -j [default: all cores].")
@click.option("--json", "as_json", is_flag=True, help="Print the image's manifest as JSON.")
def build_cmd(version: str | None, jobs: int | None, as_json: bool) -> None:
    """Fetch the source and build the kernel and upstream's selftests (or find them cached).

    Progress goes to standard error; the last line on standard output is the image folder
    (bzImage, config, selftests/, manifest.json).
    """
    try:
        img = _image(version, jobs)
    except ERRORS as e:
        fail(e)
    emit({"path": str(img.root), **img.manifest}, as_json,
         f"{img.root}  (Linux {img.release}, {img.manifest['package']} "
         f"{img.manifest['debian_version']})")


@realkernel.command("selftests")
@click.option("--test", "tests", multiple=True, type=click.Choice(SELFTESTS),
              help="Run only this selftest (repeatable) [default: all five].")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=OUT / "selftests", show_default=True, help="Results and console logs.")
@click.option("--echo", is_flag=True, help="Show the guests' consoles as they run.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def selftests_cmd(tests: tuple[str, ...], out: Path, echo: bool, as_json: bool) -> None:
    """Run upstream's tools/testing/selftests/liveupdate inside the real kernel.

    `liveupdate` (the kselftest-harness cases) runs once; each kexec test
    (luo_kexec_simple, luo_multi_session, luo_stress_sessions, luo_stress_files) gets its own
    boot: stage 1, kexec_file_load of the same kernel, stage 2 in the next kernel -- as
    upstream's vmtest.sh. Exit status 1 if any test fails.
    """
    from liveupdate.realkernel import selftests as st

    try:
        img = _image()
        outcomes = st.run_all(img, out.resolve(), tests or st.SELFTESTS, echo=echo)
    except ERRORS as e:
        fail(e)
    rows = [{"test": o.result.test, "ok": o.result.ok, "passed": o.result.count("pass"),
             "failed": o.result.count("fail"), "skipped": o.result.count("skip"),
             "note": o.result.note, "seconds": round(o.seconds, 1), "out": str(o.out),
             "cases": [{"name": n, "status": s} for n, s in o.result.cases]}
            for o in outcomes]
    if as_json:
        click.echo(json.dumps({"kernel_release": img.release, "results": rows}, indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"upstream liveupdate selftests on Linux {img.release}")
        for col in ("test", "result", "passed", "failed", "skipped", "seconds"):
            table.add_column(col)
        for r in rows:
            table.add_row(str(r["test"]), "PASS" if r["ok"] else f"FAIL {r['note']}",
                          str(r["passed"]), str(r["failed"]), str(r["skipped"]),
                          f"{r['seconds']:.0f}")
        Console().print(table)
    raise SystemExit(0 if all(r["ok"] for r in rows) else 1)


@realkernel.command("run", context_settings={"ignore_unknown_options": True})
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--kexec", is_flag=True,
              help="After the command, kexec into the same kernel and run it again there "
                   "(lu_harness_stage=2 is on the second kernel's command line).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=OUT / "run",
              show_default=True, help="Results folder, shared read-write with the guest.")
@click.option("--append", default="", help="More kernel command line.")
@click.option("--memory", "memory_mib", type=click.IntRange(256, 2048), default=512,
              show_default=True, help="Guest RAM in MiB.")
def run_cmd(argv: tuple[str, ...], kexec: bool, out: Path, append: str,
            memory_mib: int) -> None:
    """Boot the real kernel and run ARGV inside it, as root, in this repository (the
    host's root filesystem read-only; OUT writable).

    ARGV's standard output and error are printed when the guest has powered off, then the
    console log's path. The exit status is ARGV's (with --kexec, the second run's). With
    --kexec, a first run that fails skips the kexec; a kexec that fails, or a second kernel
    that never runs ARGV, is an error (exit 1) naming why.

    \b
    Example:
      luoctl realkernel run -- .venv/bin/python -c 'import os; print(os.uname())'
      luoctl realkernel run --kexec -- cat /proc/cmdline
    """
    from liveupdate.realkernel.vm import boot

    try:
        img = _image()
        t0 = time.monotonic()
        run = boot(img, {"job": "command", "argv": list(argv), "kexec": kexec},
                   out.resolve(), memory_mib=memory_mib, append=append)
    except ERRORS as e:
        fail(e)
    rc = None
    try:
        for st in (1, 2):
            if (run.out / f"command.stage{st}.out").exists():
                click.echo((run.out / f"command.stage{st}.out").read_text(errors="replace"),
                           nl=False)
                click.echo((run.out / f"command.stage{st}.err").read_text(errors="replace"),
                           nl=False, err=True)
                rc = run.stage_rc(st)
        rc1, rc2 = run.stage_rc(1), run.stage_rc(2)
    except ERRORS as e:
        fail(e)
    click.echo(f"realkernel: guest ran {time.monotonic() - t0:.1f} s; console in "
               f"{run.out / 'console.log'}", err=True)
    if rc1 is None:
        fail(f"the command never ran in the guest; see {run.out / 'console.log'}")
    if kexec and rc1 == 0 and rc2 is None:
        fail(f"no second run: {run.kexec_error() or 'the next kernel never started it'}; "
             f"see {run.out / 'console.log'}")
    raise SystemExit(rc)


@realkernel.command("capture")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for the capture (replaced if it exists).")
@click.option("--memory", "memory_mib", type=click.IntRange(256, 2048), default=512,
              show_default=True,
              help="Guest RAM in MiB, 256-2048 (the RAM images are this size, sparse; above "
                   "about 2.75 GiB QEMU's RAM is no longer one block at 0 that pmemsave can "
                   "save whole).")
@click.option("--append", default="",
              help="More kernel command line, e.g. test_kho.max_mem=65536 for a capture "
                   "small enough to keep (test_kho preserves 8 MiB of random folios).")
@click.option("--fixture", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write the small form kept in the repository (only the pages the "
                   "handover uses, xz) to this folder.")
@click.option("--echo", is_flag=True, help="Show the guest's console as it runs.")
@click.option("--json", "as_json", is_flag=True, help="Print what was captured as JSON.")
def capture_cmd(out: Path, memory_mib: int, append: str, fixture: Path | None, echo: bool,
                as_json: bool) -> None:
    """Preserve memfds of chosen shapes in LUO sessions on the real kernel, kexec, and save
    everything a user could hold of the handover: RAM at the jump (raw and ELF core), the
    setup_data payload, the debugfs blobs before and after, and the next kernel's view of
    every preserved file (stage2.json).

    \b
    Example:
      luoctl realkernel capture --out /tmp/cap
      luoctl inspect --ram /tmp/cap/ram.raw /tmp/cap/setup_data.payload --extract /tmp/x
    """
    from liveupdate.realkernel.capture import capture

    try:
        info = capture(_image(), out.resolve(), memory_mib=memory_mib, append=append,
                       echo=echo)
        if fixture is not None:
            from liveupdate.realkernel.fixture import pack

            index = pack(out, fixture)
            info["fixture"] = {"path": str(fixture), "pages": sum(n for _, n in
                                                                  index["extents"])}
    except ERRORS as e:
        fail(e)
    emit(info, as_json, f"captured Linux {info['kernel_release']} in {out} "
         f"({info['seconds']} s): every preserved file came back as it left")


@realkernel.command("differential")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=OUT / "differential", show_default=True,
              help="The real run's folder (console, records, RAM at the jump).")
@click.option("--replay", is_flag=True,
              help="Do not boot the real kernel: remake the table from the kept answers.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def differential_cmd(out: Path, replay: bool, as_json: bool) -> None:
    """The differential suite (issue #24): every scenario of
    liveupdate.scenario.differential.cases on the real kernel (one boot, one kexec), its
    answers kept in tests/realkernel/data/differential-<release>.json, then the same steps
    on an emulated 7.3 machine and the table written to docs/differential.md.

    \b
    Examples:
      luoctl realkernel differential
      luoctl realkernel differential --replay
    """
    from liveupdate.realkernel import differential
    from liveupdate.scenario.differential import compare, table

    try:
        if replay:
            data = table.kept()
        else:
            data = differential.record(_image(), out)
            table.write_data(data)
        _text, c = table.regenerate(data, out / "emulated")
    except ERRORS as e:
        fail(e)
    undocumented, stale = compare.verdict(c)
    summary = {"kernel_release": data["kernel_release"], "scenarios": len(c.scenarios),
               "steps": c.steps, "agree": c.agreements, "differ": len(c.differences),
               "undocumented": len(undocumented), "stale_deviations": len(stale),
               "table": str(table.DOC)}
    emit(summary, as_json, f"Linux {data['kernel_release']}: {c.steps} steps, "
         f"{c.agreements} agree, {len(c.differences)} differ ({len(undocumented)} "
         f"undocumented); table in {table.DOC}")
    if undocumented or stale:
        fail(f"{len(undocumented)} undocumented differences, {len(stale)} listed deviations "
             f"that no longer happen: see {table.DOC}")
