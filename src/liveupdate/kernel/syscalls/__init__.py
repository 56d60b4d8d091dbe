"""The server side of the syscall transport, and userspace process lifecycle."""
