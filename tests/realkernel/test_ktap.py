"""KTAP and kexec-test verdicts, on real output of upstream's selftests on Linux 7.3.4
(data/: saved from `luoctl realkernel selftests`)."""

from __future__ import annotations

from pathlib import Path

from liveupdate.realkernel import ktap

DATA = Path(__file__).with_name("data")


def test_harness_output_parses_every_case() -> None:
    r = ktap.parse("liveupdate", (DATA / "liveupdate.ktap").read_text())
    assert r.plan == 15 and len(r.cases) == 15
    assert r.totals == {"pass": 15, "fail": 0, "xfail": 0, "xpass": 0, "skip": 0, "error": 0}
    assert r.cases[0] == ("liveupdate_device.basic_open_close", "pass")
    assert r.ok


def test_a_failed_or_missing_case_fails_the_run() -> None:
    text = (DATA / "liveupdate.ktap").read_text()
    failed = text.replace("ok 3 liveupdate_device.create_duplicate_session",
                          "not ok 3 liveupdate_device.create_duplicate_session")
    r = ktap.parse("liveupdate", failed)
    assert not r.ok and r.count("fail") == 1
    # a crash after case 14: the plan says 15
    cut = text[: text.index("ok 15 ")]
    assert not ktap.parse("liveupdate", cut).ok
    assert not ktap.parse("liveupdate", "").ok


def test_skip_is_not_a_pass_or_a_failure() -> None:
    r = ktap.parse("t", "1..2\nok 1 a\nok 2 b # SKIP no /dev/liveupdate\n")
    assert r.cases == [("a", "pass"), ("b", "skip")] and r.ok
    todo = ktap.parse("t", "1..2\nok 1 a\nnot ok 2 b # TODO not yet\n")
    assert todo.cases == [("a", "pass"), ("b", "xfail")] and todo.ok


def test_subtests_do_not_replace_the_plan_and_totals_must_agree() -> None:
    nested = "1..2\n    1..3\n    ok 1 sub\nok 1 a\nok 2 b\n"
    r = ktap.parse("t", nested)
    assert r.plan == 2 and [n for n, _ in r.cases] == ["a", "b"] and r.ok
    lying = "1..1\nok 1 a\n# Totals: pass:0 fail:1 xfail:0 xpass:0 skip:0 error:0\n"
    assert not ktap.parse("t", lying).ok


def test_kexec_verdict_needs_both_stages_and_the_pass_line() -> None:
    s1 = (DATA / "luo_kexec_simple.stage1.ktap").read_text()
    s2 = (DATA / "luo_kexec_simple.stage2.ktap").read_text()
    assert ktap.kexec_verdict("luo_kexec_simple", (0, s1), (0, s2)).ok
    no_stage2 = ktap.kexec_verdict("luo_kexec_simple", (0, s1), (None, ""))
    assert not no_stage2.ok and "never ran" in no_stage2.note
    bailed = ktap.kexec_verdict("luo_kexec_simple", (0, s1),
                                (1, "Bail out! luo_retrieve_session failed\n"))
    assert not bailed.ok and "Bail out!" in bailed.note
    silent = ktap.kexec_verdict("luo_kexec_simple", (0, s1), (0, "# [STAGE 2] ...\n"))
    assert not silent.ok
    assert not ktap.kexec_verdict("luo_kexec_simple", (1, s1), (0, s2)).ok
