"""MuseTalk v1.5 networks and their weights.

- `layout`: the files under the models root (env `LIPSTREAM_MODELS`, default `./models`), what is missing.
- `download`: fetch them from the Hugging Face Hub (`lipstream models download`).
- `unet`, `vae`, `whisper`, `positional`: build/load each network.
- `load`: every network at once, placed on a device/dtype, cached per process.
- `latents`: an avatar's UNet image input from its face crops.

`layout`, `download` and `cli` import neither torch nor diffusers, so the command line stays quick.
"""
