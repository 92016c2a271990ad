"""The daemon's side of a distributed decoder (`dist.engine.RemoteDecoder`) over a stand-in
group that answers as rank 0 would: which sequences it still counts as its own."""

from __future__ import annotations

from mlxlite.dist.engine import LockstepEngine, RemoteDecoder, RemoteLoaded
from mlxlite.errors import Unsupported
from mlxlite.options import Options
from mlxlite.results import Finish


class Group:
    """Rank 0's answers: a decoder id, each add's counts, then the step's events."""

    def __init__(self, events: list) -> None:
        self.generation, self.detail, self.events = 1, "", events

    def call(self, op: str, *args):
        if op == "decoder":
            return 7
        if op == "add":
            return len(args[2]), (2, 0, 2)
        assert op == "step"
        return self.events, {}, (0, 0, 0)


def test_a_sequence_that_failed_alone_is_no_longer_counted():
    """After a group restart the decoder counts the sequences it still holds: neither the one
    that finished nor the one that failed alone (its error came back as its event)."""
    group = Group([("done", Finish("stop", 2, 2, 1, 0.0, 0.0)), ("bad", Unsupported("too ambiguous"))])
    engine = LockstepEngine(group)
    engine._ready = lambda loaded: None     # the model is "loaded" on the stand-in ranks
    dec = RemoteDecoder(engine, RemoteLoaded("m", "sha256:0", None), 4, False)
    dec.add("done", [1, 2], Options())
    dec.add("bad", [1, 2], Options())
    events = dec.step(lambda key: False)
    assert isinstance(events[1][1], Unsupported)
    group.generation = 2
    assert len(dec) == 0
