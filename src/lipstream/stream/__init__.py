"""Turning an engine's faces into the avatar's video: compositing, sessions, scheduling."""
