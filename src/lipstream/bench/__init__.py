"""Benchmarks: each prints a table and writes JSON (device, commit, date, settings, medians) to bench/results/.

Each module is cheap to import (heavy imports live in its functions): the command line imports them
all to build its parser."""

# The frame sizes the image benchmarks render at: (height, width) and the face box (x1, y1, x2, y2).
FRAME_SIZES = {"1080p": ((1080, 1920), (760, 220, 1060, 580)), "720p": ((720, 1280), (500, 150, 700, 390))}
