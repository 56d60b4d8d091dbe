"""Orchestration on top of everything else: the demo, the soak, the fault runs, the in-process
rigs and the matrices built from them. ``cli/``, ``bench/`` and the tests call these; nothing
below imports them."""
