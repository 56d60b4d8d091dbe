"""The userspace uAPI-generation objects: chosen once from the release table, and each
agreeing with the uAPI table it stands for."""

from __future__ import annotations

import errno

import pytest

from liveupdate.abi import uapi, uapi_generation
from liveupdate.abi.uapi import Gen
from liveupdate.client.generation import generation_of, kernel_generation
from liveupdate.errors import LiveUpdateError

NEWEST = uapi_generation.RELEASES[0].handover  # the newest release (not a suffixed one)


@pytest.mark.parametrize("release, gen, handover", [
    ("6.17.0-lu-v3", Gen.V3, "v3"), ("6.19.0", Gen.V6_19, "6.19"),
    ("7.0.3-lu", Gen.V6_19, "7.0"), ("7.1.0", Gen.V7_1, "7.1"), ("7.2.0-lu", Gen.V7_1, "7.2"),
    ("8.0", Gen.V7_1, NEWEST),  # a release past the table counts as the newest generation
    ("7.3.0-lu-posted", Gen.V7_1, "7.3+posted"),  # the suffix beats the number
])
def test_release_table(release: str, gen: Gen, handover: str) -> None:
    assert generation_of(release) is uapi_generation.BY_GEN[gen]
    assert kernel_generation(release) == handover


@pytest.mark.parametrize("release, err, handover", [
    ("6.18.2", errno.EOPNOTSUPP, "6.18"), ("6.16", errno.EOPNOTSUPP, "6.16"),
    ("6.17.0", errno.EOPNOTSUPP, "6.16"), ("linux", errno.EINVAL, None),
])
def test_releases_without_luo(release: str, err: int, handover: str | None) -> None:
    with pytest.raises(LiveUpdateError) as e:
        generation_of(release)
    assert e.value.errno == err
    if handover is not None:
        assert kernel_generation(release) == handover


@pytest.mark.parametrize("u", uapi_generation.ALL, ids=str)
def test_each_object_agrees_with_its_uapi_table(u: uapi_generation.UapiGeneration) -> None:
    names = {i.name for i in uapi.TABLES[u.gen]}
    assert u.sessions == ("CREATE_SESSION" in names)
    assert u.state_machine == ("SET_EVENT" in names)
    assert u.get_name == ("SESSION_GET_NAME" in names)
    assert uapi_generation.named(str(u)) is u


def test_asking_for_the_wrong_kind_is_eopnotsupp() -> None:
    with pytest.raises(LiveUpdateError) as e:
        uapi_generation.V3.need(True, "CREATE_SESSION")
    assert e.value.errno == errno.EOPNOTSUPP and "v3" in e.value.message
    with pytest.raises(LiveUpdateError):
        uapi_generation.named("5.0")
