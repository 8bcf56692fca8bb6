"""Benchmarks: scripts that measure methods side by side in one run and write JSON."""
