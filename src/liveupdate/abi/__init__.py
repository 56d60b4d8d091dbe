"""Pure codecs for every byte that crosses a kexec or the LUO uAPI.

Nothing here holds state or does I/O; the emulated kernel, the userspace and the inspection
tools all share these modules. Physical memory is read through :class:`PhysMem`.
"""
