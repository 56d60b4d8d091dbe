"""numpy helpers the handover decoders share."""

from __future__ import annotations

import numpy as np


def has_repeats(a: np.ndarray) -> bool:
    """Whether any value occurs twice in ``a``: a sort and a compare of neighbours. Not
    ``np.unique``, which hashes uint64 -- 0.7 ms for the 4096 folios of an 8 GiB guest on
    2 MiB pages against 0.05, inside the retrieve that ends its VM's pause."""
    s = np.sort(a)
    return bool(len(s) > 1 and np.any(s[1:] == s[:-1]))
