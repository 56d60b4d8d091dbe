"""The command line as Linux parses it, and no command line ever panics the kernel."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from liveupdate.abi.cmdline import Cmdline, kstrtobool, memparse
from liveupdate.errors import LiveUpdateError
from liveupdate.kernel import power
from liveupdate.kernel.cmdline import parse_kho_scratch
from tests.kernel.conftest import Rig


def test_kstrtobool_first_character_decides() -> None:
    assert [kstrtobool(v) for v in ("1", "yes", "True", "on", "oN", "0", "no", "False",
                                    "off", "oF")] == [True] * 5 + [False] * 5
    assert [kstrtobool(v) for v in ("enable", "o", "", None, "2", "x")] == [None] * 6


def test_memparse_as_linux() -> None:
    assert memparse("010M") == (8 << 20, 4)  # a leading 0 is octal
    assert memparse("0x10k") == (16 << 10, 5)
    assert memparse("64M,rest") == (64 << 20, 3)
    assert memparse("08") == (0, 1)  # octal stops at 8
    assert memparse("g1") == (0, 0)


def test_kho_scratch_as_upstream() -> None:
    assert parse_kho_scratch("010M,0x1G,2m").lowmem == 8 << 20
    assert parse_kho_scratch("150%").scale == 150
    assert parse_kho_scratch("0,0,4M").pernode == 4 << 20  # one zero is fine (6.19)
    for bad, err in (("99999999999%", errno.EINVAL), ("4294967296%", errno.ERANGE),
                     ("%", errno.EINVAL), ("1M,2M", errno.EINVAL), ("", errno.EINVAL),
                     ("0,0,0", errno.EINVAL), ("1M,2M,3Mx", errno.EINVAL)):
        with pytest.raises(LiveUpdateError) as e:
            parse_kho_scratch(bad)
        assert e.value.errno == err, bad


def test_malformed_options_are_logged_once_and_keep_defaults() -> None:
    said: list[str] = []
    c = Cmdline.parse("kho=enable liveupdate kho_sanitize=off", warn=said.append)
    assert c.flag("kho", True) is True and c.flag("kho") is False  # default both times
    assert c.flag("liveupdate") is False and c.flag("kho_sanitize", True) is False
    assert said == ["Malformed early option 'kho'", "Malformed early option 'liveupdate'"]


class Panicked(Exception):
    pass


@pytest.fixture
def no_panic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    def panic(k: object, reason: str) -> None:
        raise Panicked(reason)
    monkeypatch.setattr(power, "panic", panic)
    monkeypatch.chdir(tmp_path)  # a relative lu.run= makes the kernel's runtime folder here
    yield


OPTIONS = ["kho", "kho_scratch", "reserve_mem", "kho_sanitize", "liveupdate",
           "liveupdate_compat", "transparent_hugepage_shmem", "lu.run", "whatever"]
VALUE = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Zs", "Cc")), max_size=24)
WORD = st.one_of(st.sampled_from(OPTIONS),
                 st.builds(lambda k, v: f"{k}={v}", st.sampled_from(OPTIONS), VALUE))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(words=st.lists(WORD, max_size=6))
def test_no_command_line_panics_the_kernel(no_panic: None, words: list[str]) -> None:
    rig = Rig(256 << 20)
    try:
        rig.boot(" ".join(["kho=on", *words]))
    except LiveUpdateError as e:  # only the boot loader may refuse (an over-long line)
        assert e.errno == errno.EINVAL and "command line" in e.message
    finally:
        rig.close()
