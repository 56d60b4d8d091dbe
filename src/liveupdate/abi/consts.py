"""Architecture constants shared by every format: 4 KiB pages, MAX_PAGE_ORDER 10."""

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
MAX_PAGE_ORDER = 10
NR_PAGE_ORDERS = MAX_PAGE_ORDER + 1
U64_MAX = (1 << 64) - 1


def get_order(size: int) -> int:
    """Linux get_order(): the smallest order whose 2^order pages hold ``size`` bytes."""
    return max(0, (-(-size // PAGE_SIZE) - 1).bit_length())
