"""The kernel configuration check and the cache key of the real-kernel build."""

from __future__ import annotations

import shutil

import pytest

from liveupdate.errors import LiveUpdateError
from liveupdate.realkernel import build, source


def test_fragment_asks_for_kho_luo_and_upstreams_selftest_options() -> None:
    opts = build.fragment_options(build.FRAGMENT.read_text())
    for name in ("CONFIG_KEXEC_FILE", "CONFIG_KEXEC_HANDOVER", "CONFIG_KEXEC_HANDOVER_DEBUGFS",
                 "CONFIG_KEXEC_HANDOVER_ENABLE_DEFAULT", "CONFIG_LIVEUPDATE",
                 "CONFIG_LIVEUPDATE_MEMFD", "CONFIG_LIVEUPDATE_TEST", "CONFIG_TEST_KEXEC_HANDOVER",
                 "CONFIG_HUGETLBFS", "CONFIG_9P_FS", "CONFIG_VIRTIO_PCI"):
        assert opts[name] == "y", name


def test_unmet_names_what_kconfig_dropped() -> None:
    frag = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=16\n"
    assert build.unmet(frag, "CONFIG_A=y\nCONFIG_C=16\n") == []
    assert build.unmet(frag, "# CONFIG_A is not set\nCONFIG_B=y\nCONFIG_C=8\n") == \
        ["CONFIG_A=y", "CONFIG_B=n", "CONFIG_C=16"]


def test_cache_key_changes_with_version_revision_and_fragment() -> None:
    k = build.key("7.3.4", "7.3.4-1~bpo13+1", "CONFIG_A=y\n")
    assert k.startswith("7.3.4-7.3.4-1_bpo13+1-") and "/" not in k
    assert k != build.key("7.3.5", "7.3.5-1~bpo13+1", "CONFIG_A=y\n")
    assert k != build.key("7.3.4", "7.3.4-2~bpo13+1", "CONFIG_A=y\n")
    assert k != build.key("7.3.4", "7.3.4-1~bpo13+1", "CONFIG_A=m\n")


@pytest.mark.skipif(shutil.which("dpkg") is None, reason="needs dpkg --compare-versions")
def test_newest_is_debians_order_not_the_strings() -> None:
    assert source.newest(["7.3~rc7-1~exp1", "7.3.4-1~bpo13+1", "7.3.10-1~bpo13+1"]) == \
        "7.3.10-1~bpo13+1"
    assert source.newest(["7.3~rc7-1~exp1", "7.3-1"]) == "7.3-1"
    with pytest.raises(LiveUpdateError, match="offers"):
        source.newest([])


@pytest.mark.parametrize("bad", ["..", ".", "../x", "7.3.4/../..", "", "-1", "7.3 4"])
def test_a_version_that_could_name_another_folder_is_refused(bad: str) -> None:
    with pytest.raises(LiveUpdateError, match="not a Debian version"):
        source.check_version(bad)
    assert source.upstream("7.3.4-1~bpo13+1") == "7.3.4"
    assert source.upstream("7.3~rc7-1~exp1") == "7.3~rc7"
