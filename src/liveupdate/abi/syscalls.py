"""The emulated kernel's system calls as they travel over the syscall transport.

A request is a :mod:`liveupdate.abi.wire` message whose header names ``op`` plus arguments; the
reply header carries ``errno`` (0 on success) and ``message``. The ``reboot`` commands are
Linux's ``LINUX_REBOOT_CMD_*`` values.
"""

LINUX_REBOOT_CMD_RESTART = 0x01234567
LINUX_REBOOT_CMD_POWER_OFF = 0x4321FEDC
LINUX_REBOOT_CMD_KEXEC = 0x45584543
REBOOT_CMDS = {LINUX_REBOOT_CMD_RESTART: "restart", LINUX_REBOOT_CMD_POWER_OFF: "power_off",
               LINUX_REBOOT_CMD_KEXEC: "kexec"}

SYSCALL_FD_ENV = "LU_SYSCALL_FD"
KEXEC_CMDLINE_MAX = 2048
