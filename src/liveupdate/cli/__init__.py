"""Command-line front ends: they parse and print, nothing more."""
