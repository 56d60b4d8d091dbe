"""A small VMM: a guest that proves its memory, run under the host's /dev/kvm or under
unicorn (QEMU's TCG as a library), whose memory and vCPU state survive a host live update."""
