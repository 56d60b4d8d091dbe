"""The one table of handover formats, and the compatibility matrix it encodes."""

import pytest

from liveupdate.abi import formats, image
from liveupdate.errors import AbiError
from liveupdate.tools import report
from tests.abi.fuzz_runner import DECODERS, SEEDS


def test_every_format_has_a_describer_a_seed_and_a_fuzzer() -> None:
    names = {f.name for f in formats.FORMATS}
    assert set(report.DESCRIBERS) == names
    assert names <= set(SEEDS)
    assert {f"format.{n}" for n in names} <= set(DECODERS)


def test_seeds_decode_with_the_tables_decoder() -> None:
    for f in formats.FORMATS:
        f.decode(SEEDS[f.name])


@pytest.mark.parametrize("writer, reader, bad", [
    ("6.19", "6.19", set()),
    ("7.1", "7.1", set()),
    ("v3", "v3", set()),
    ("6.19", "7.1", {("memfd-v1", "cannot read"), ("luo-flb", "requires")}),
    ("6.19", "v3", {("luo-session", "cannot read"), ("memfd-v1", "cannot read")}),
    ("7.1", "6.19", {("memfd-v2", "cannot read")}),  # 6.19 ignores the luo-flb node
    ("v3", "6.19", {("luo-v3", "cannot read"), ("files-fdt", "cannot read"),
                    ("memfd-fdt", "cannot read")}),
])
def test_compatibility_matrix(writer: str, reader: str, bad: set[tuple[str, str]]) -> None:
    got = {(i.format.name, i.reason) for i in formats.incompatibilities(writer, reader)}
    assert got == bad


def test_only_what_is_written_counts() -> None:
    """A 6.19 kernel that preserved no memfd hands over nothing 7.1 cannot read, but 7.1
    still requires the FLB node 6.19 never writes."""
    written = [formats.get("setup_data"), formats.get("kho-root"), formats.get("luo-session")]
    got = formats.incompatibilities("6.19", "7.1", written)
    assert [(i.format.name, i.reason) for i in got] == [("luo-flb", "requires")]


def test_images_take_their_generations_from_the_table() -> None:
    for gen in formats.GENERATIONS:
        assert image.decode(image.KernelImage(luo=gen).encode()).luo == gen
    with pytest.raises(AbiError, match="unknown LUO generation"):
        formats.check_generation("5.10")
    with pytest.raises(AbiError, match="unsupported"):
        image.KernelImage(luo="5.10").encode()
