"""Memory management: memblock, page metadata, the buddy allocator, scratch (CMA) areas."""
