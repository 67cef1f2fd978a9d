"""The parameters every caching policy shares: its cache's size and what a miss does."""
from __future__ import annotations

from dataclasses import dataclass

from sim.params import ParamError, Params

MISS_MODES = ("fetch", "reroute")


@dataclass(frozen=True)
class CacheParams(Params):
    capacity: float = 1.0                 # fraction of each layer's experts the cache holds
    capacity_bytes: float | None = None   # instead: the cache's size in bytes, over all layers
    miss: str = "fetch"                   # a non-resident expert is fetched, or its route rerouted

    def check(self) -> None:
        super().check()
        c = self.capacity
        if not isinstance(c, (int, float)) or not 0 < c <= 1:
            raise ParamError(f"capacity must be a fraction of experts in (0, 1], got {c!r}")
        b = self.capacity_bytes
        if b is not None and not (isinstance(b, (int, float)) and b > 0):
            raise ParamError(f"capacity_bytes must be a positive number, got {b!r}")
        if self.miss not in MISS_MODES:
            raise ParamError(f"miss must be one of {MISS_MODES}, got {self.miss!r}")
