"""The emulated machine: the hardware that outlives every kernel (RAM, firmware, console,
power and jump) and its control socket. It knows nothing of kernel data structures."""
