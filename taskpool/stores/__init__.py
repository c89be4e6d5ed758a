"""Backends of the `Store` interface; each imports its driver only when used."""
