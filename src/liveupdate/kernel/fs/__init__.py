"""Files of the emulated kernel: open files and their handles, memfd, and memfd's LUO
handler beside it."""
