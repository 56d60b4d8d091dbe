"""Programs that run as userspace of the emulated kernel (started by init or ``machine run``)."""
