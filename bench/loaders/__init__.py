"""Loaders: one per mode, rule text → the kernel tables at real struct sizes."""
