"""The block layouts of a run (how decoder layers are grouped into blocks; ``common/partition.py`` builds them),
apart from the partition so that the CLI can name them without importing torch."""
from __future__ import annotations

__all__ = ["BLOCK_LAYOUTS", "NEW_RUN_LAYOUT", "check_layout"]

#: contiguous: block k holds layers kL..kL+L-1 (the paper's); strided: block k of B holds layers k, k+B, k+2B, ...
BLOCK_LAYOUTS = ("contiguous", "strided")
#: The layout of a new run that names none (a run keeps the layout it was created with; runs from before the
#: setting existed are contiguous).
NEW_RUN_LAYOUT = "strided"


def check_layout(layout: str) -> str:
    """``layout`` if it is one of ``BLOCK_LAYOUTS``; a clear error otherwise."""
    if layout not in BLOCK_LAYOUTS:
        raise ValueError(f"unknown block layout {layout!r}; known: {', '.join(BLOCK_LAYOUTS)}")
    return layout
