"""Issue #21: "which generation, which format" is answered by the generation objects and
their tables only. Everybody else asks those objects -- checked here, not by eye."""

from __future__ import annotations

from tests.shape import genscan

# the generation objects, their tables, and the codecs that check a blob is their own format
ALLOWED = frozenset({
    "abi/generations.py",  # the table: LUO generations, releases, KHO cores, format order
    "abi/formats.py",  # the table of handover formats and Linux's behaviour between them
    "abi/image.py",  # the image header, validated against the table
    "abi/uapi.py",  # the uAPI table of every generation
    "abi/kho.py",  # codec: a root is kho-v1, kho-v3 or kho-v4
    "abi/luo_ser.py",  # codec: a luo_ser blob is luo-v5
    "abi/memfd.py",  # codec: memfd-v1 and memfd-v2 structs
    "kernel/kho/core.py",  # the KHO core objects
    "tools/report_identify.py",  # the format table's sniffer: which format a blob is
})


def test_no_generation_question_outside_the_generation_objects() -> None:
    hits = genscan.scan(ALLOWED)
    assert not hits, "ask the generation objects instead:\n" + "\n".join(map(str, hits))


def test_the_scan_finds_a_planted_question() -> None:
    planted = (
        "def f(k, luo, core, img):\n"
        "    if k.image.luo == '7.2':\n"
        "        return 1\n"
        "    if luo.gen is Gen.V3 or img.kho in ('kho-v3', 'kho-v4'):\n"
        "        return 2\n"
        "    if fmt == memfd_abi.MEMFD_V2:\n"
        "        return 3\n"
        "    return core.notifiers\n"
    )
    vocab = genscan.words()
    hits = genscan.scan_source(planted, "planted.py", vocab, genscan.constants(vocab))
    assert sorted({h.line for h in hits}) == [2, 4, 6, 8], hits
    assert any("Gen.V3" in h.what for h in hits) and any("'kho-v4'" in h.what for h in hits)


def test_no_format_is_a_question_only_about_a_component() -> None:
    planted = (
        "def f(fmts, flb, fault):\n"
        "    if fmts['flb'] == 'none' or flb != 'none':\n"
        "        return 1\n"
        "    if fault == 'none':\n"
        "        return 2\n"
    )
    vocab = genscan.words()
    hits = genscan.scan_source(planted, "planted.py", vocab, genscan.constants(vocab))
    assert [h.line for h in hits] == [2, 2], hits  # both comparisons of line 2


def test_a_table_lookup_is_not_a_question() -> None:
    source = "RULES = {'6.19': 1, '7.1': 2}\nrule = RULES[gen.rules]\n"
    vocab = genscan.words()
    assert genscan.scan_source(source, "table.py", vocab, genscan.constants(vocab)) == []
