"""The emulated kernel: one process per boot, with nothing but RAM and the boot parameters.

Imports flow only to :mod:`liveupdate.abi`; the kernel never imports the machine, the client,
luod or the VMM.
"""
