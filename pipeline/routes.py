"""The active routes: which endpoints each domain's events go to."""

from __future__ import annotations

from collections.abc import Mapping

from trio_util import AsyncValue

# domain (lower case) → its endpoint URLs. Replaced whole, never mutated, so a
# reader sees either the old mapping or the new one.
Routes = Mapping[str, tuple[str, ...]]


def open_routes(initial: Routes) -> AsyncValue[Routes]:
    """The shared holder of the active routes, which actors read and wait on."""
    return AsyncValue(dict(initial))
