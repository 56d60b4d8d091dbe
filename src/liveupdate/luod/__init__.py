"""luod: the live update daemon -- the only opener of /dev/liveupdate, which takes its
clients' resources and walks everyone through the live update."""
