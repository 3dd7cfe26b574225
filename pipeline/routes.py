"""The active routes: which endpoints each domain's events go to."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from trio_util import AsyncValue


@dataclass(frozen=True, slots=True)
class Endpoint:
    url: str
    secret: str | None = None  # when set, requests are signed (pipeline.signing)

    def __repr__(self) -> str:  # never print a secret
        return f"Endpoint({self.url!r}, signed={self.secret is not None})"


# domain (lower case) → its endpoints. Replaced whole, never mutated, so a
# reader sees either the old mapping or the new one.
Routes = Mapping[str, tuple[Endpoint, ...]]


def open_routes(initial: Routes) -> AsyncValue[Routes]:
    """The shared holder of the active routes, which actors read and wait on."""
    return AsyncValue(dict(initial))
