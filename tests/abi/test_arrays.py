import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from liveupdate.abi.arrays import has_repeats


@given(st.lists(st.one_of(st.integers(0, 16), st.integers(0, 2**64 - 1)), max_size=64))
def test_has_repeats_agrees_with_unique(values: list[int]) -> None:
    a = np.array(values, np.uint64)
    assert has_repeats(a) == (len(np.unique(a)) != len(a))
