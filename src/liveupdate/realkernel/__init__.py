"""The real Linux kernel as a tool: fetch, build, boot, run its selftests, capture handovers.

Everything else in the project models Linux; this package runs it. Linux 7.3 comes from
Debian's ``linux-source-7.3`` (:mod:`.source`), is built with KHO and LUO from
``make tinyconfig`` plus ``kconfig.fragment`` and cached outside the checkout keyed by
version and fragment (:mod:`.build`), and boots under QEMU (TCG) through virtme-ng with the
host's root filesystem shared read-only, so the repository's ``.venv`` runs inside the guest
(:mod:`.vm`). Inside, :mod:`.guest` plays the part of upstream's selftest ``init.c``: it runs
a stage, loads the same kernel with ``kexec_file_load`` and jumps; the command line
``virtme-ng`` passed comes back after the kexec, so the same command runs the second stage.
The host side can stop the guest at ``kexec_core: Starting new kernel`` and save its RAM
(:mod:`.capture`).

Nothing here is imported by the emulated kernel or by luod; it needs Debian's
``qemu-system-x86`` and a kernel toolchain (:mod:`.host` names or installs them).
"""
