"""The dist wing: one model served by a group of processes, on MLX's own distributed engine.

Owns scale-out (DESIGN.md §8): `launch` (MLX's launcher and hostfile: `serve --ranks N`,
`serve --hostfile FILE --backend ring|jaccl|nccl|any`), `rank` (the process on every host:
joins the group, runs each engine call on its shard in lockstep), `group` (the daemon's
side: start, heartbeats, calls to rank 0, a lost rank failing requests with a 503 and a
restart), `engine` (`LockstepEngine`: the runner's interface for the scheduler, each call
carried out by the whole group) and `wire` (the control channel's frames). Rank 0's daemon
runs HTTP and the scheduler unchanged. What touches `mx.distributed` (the step broadcast,
sharding, token agreement) is `engine/distributed.py`: this wing never imports mlx, and
never imports the scheduler, the server or the CLI.
"""

from mlxlite.dist.engine import LockstepEngine
from mlxlite.dist.group import Group

__all__ = ["Group", "LockstepEngine"]
