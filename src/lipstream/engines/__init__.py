"""Engines: the neural (or not) step that turns audio conditioning into face crops.

`base.Engine` is the interface; `musetalk.MuseTalkEngine` runs MuseTalk v1.5 (needs the weights);
`warp.WarpEngine` animates the avatar's own mouth from the audio's loudness (no weights, one CPU core).
`select.load_engine(name)` picks one: "musetalk" when its weights are installed, else "warp"."""

# What `--engine` / the setting `engine` / a session may ask for: "auto" picks musetalk when its
# weights are installed, else warp (engines.select).
ENGINE_NAMES = ("auto", "musetalk", "warp")
