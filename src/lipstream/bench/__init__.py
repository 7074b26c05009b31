"""Benchmarks: each prints a table and writes JSON (device, commit, date, settings, medians) to bench/results/."""
