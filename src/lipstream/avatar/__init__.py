"""Avatars: everything that depends only on the face video, prepared once and reused by every session.

`model.Avatar` is the in-memory form every stage reads (frames, boxes, masks, engine material)."""

from lipstream.avatar.model import Avatar

__all__ = ["Avatar"]
