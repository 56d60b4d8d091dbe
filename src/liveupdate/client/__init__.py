"""The userspace side: how a process talks to its kernel (the same methods on the emulated
kernel's syscall transport and, for LUO, on a real ``/dev/liveupdate``)."""
