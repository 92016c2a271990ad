"""A stand-in for an `mx.distributed` group where nothing is exchanged: loading and `shard` ask a
group only its rank and size, so one process can load as any rank would (tests, bench/dist_load.py)."""

from __future__ import annotations


class Group:
    """What loading and `shard` ask of a group: its rank and size."""

    def __init__(self, rank: int, size: int) -> None:
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size
