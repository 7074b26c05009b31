"""Avatars: everything that depends only on the face video, prepared once and reused by every session.

`model.Avatar` is the in-memory form every stage reads (frames, boxes, masks, engine material).
`prepare.prepare_avatar` makes one from a video or a photo; `store` loads, lists, saves, imports
(MuseTalk folders) and deletes them; `layout` says where they live, `folder` which files they hold;
`geometry`, `masks` and `landmarks` are MuseTalk v1.5's face geometry on MediaPipe landmarks.
The package itself imports nothing, so the command line can read its options cheaply."""

DEFAULT_MAX_SECONDS = 30.0  # longest video an avatar is prepared from: a 30 s 720p cycle holds ~4 GB of frames
