"""Errors shared by the codec modules (kept apart to avoid an import cycle)."""


class CodecError(ValueError):
    """A chunk or blob failed a check (checksum, size, order, hash, format)."""
