"""Reports and examples built on :mod:`liveupdate.abi`: what ``luoctl inspect`` prints and
the example handovers ``luoctl example`` writes."""
