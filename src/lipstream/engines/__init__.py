"""Engines: the neural (or not) step that turns audio conditioning into face crops.

`base.Engine` is the interface; `musetalk.MuseTalkEngine` runs MuseTalk v1.5 (needs the weights)."""
