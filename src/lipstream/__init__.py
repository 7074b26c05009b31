"""lipstream: real-time lip-sync. Speech in, video of an avatar's face speaking it out."""

__version__ = "0.1.0"
