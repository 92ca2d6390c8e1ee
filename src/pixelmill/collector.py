"""The cyclic garbage collector, held back while a process starts.

Start-up builds hundreds of thousands of objects that live as long as the process
(modules, classes, settings). The collector would go through them again and again: in
``pixelmill process``, two full collections (50-60 ms) and a few hundred young ones per
process, on the way to the first image. So a command starts with the collector
nearly off, and once it has started (its worker or app is running), what it built is
frozen out of the collector's way and collection goes back to normal. A process that
never says it has started still collects, only rarely.
"""

from __future__ import annotations

import gc

_NORMAL = gc.get_threshold()
_STARTING = (1_000_000, *_NORMAL[1:])


def hold_back() -> None:
    """Collect rarely until :func:`started` (called when a command begins)."""
    gc.set_threshold(*_STARTING)


def started() -> None:
    """Freeze what was built so far and collect as usual from now on."""
    gc.freeze()
    gc.set_threshold(*_NORMAL)
