"""The sched wing: the one thread that owns MLX.

Owns the bounded job queue and tickets (`jobs`: what HTTP threads submit and the events
that come back), model residency and keep-alive (`scheduler.Scheduler`), continuous
batching across requests (`batch`), the prefix cache (`prefix_cache`) and Prometheus
metrics (`metrics`). Only the scheduler thread calls the engine, which it imports on that
thread (so the server starts without mlx). Never imports mlx itself, the server or the CLI.
"""

from mlxlite.sched.jobs import (
    ClientGone,
    Done,
    Embedded,
    EmbedJob,
    Failed,
    GenerateJob,
    LoadJob,
    Ready,
    Ticket,
    Tokenized,
    TokenizeJob,
    is_finish,
)
from mlxlite.sched.scheduler import ResidentInfo, Scheduler

__all__ = [
    "Scheduler", "ResidentInfo", "ClientGone", "Done", "Embedded", "EmbedJob", "Failed", "GenerateJob",
    "LoadJob", "Ready", "Ticket", "Tokenized", "TokenizeJob", "is_finish",
]
