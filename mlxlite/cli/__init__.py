"""The cli wing: the `mlxlite` command line.

Owns `verbs` (`main` and the argparse verbs; every expected failure is one `error: ...` line and exit 1),
`chat` (`run`: one-shot, piped stdin, the interactive chat, in-process or through a
daemon), `client` (a urllib client of our own daemon), `modelfile` (`create` and
`validate`), `show` (a model's summary, its human view and its Modelfile-style sections)
and `human` (byte sizes, ages and tables as printed). Each verb imports what it needs when
it runs, so `--help`, `list` and `pull` never import mlx. Nothing imports this wing but the
entry points.
"""

from mlxlite.cli.verbs import main

__all__ = ["main"]
