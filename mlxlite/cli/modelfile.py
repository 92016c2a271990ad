"""The Modelfile verbs of the command line: `create` and `validate`.

Imported by `cli/verbs.py` only when one of these verbs runs (the Modelfile machinery is
not for `--help` or `list`). Errors found at create time are pointed at the FROM line.
Never imports mlx.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from mlxlite.errors import BadRequest, MlxliteError
from mlxlite.modelfile import (
    Modelfile,
    check,
    create,
    parse,
    parse_quantize_type,
    spec_from_modelfile,
)
from mlxlite.store import Store


def _read_modelfile(path_text: str | None) -> tuple[Modelfile, Path]:
    path = Path(path_text or "Modelfile").expanduser()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadRequest(f"cannot read {path}: {exc.strerror or exc}") from None
    return parse(data, source=str(path)), path.resolve().parent


def _located(mf: Modelfile, source: str, exc: MlxliteError) -> MlxliteError:
    """A FROM problem found at create time, pointed at the FROM line."""
    if not str(exc).startswith("FROM "):
        return exc
    at = mf.from_
    return type(exc)(f"{source}:{at.line}:{at.column}: {exc}")


def _quantizer(source: Path, qtype: str, out: Path, say: Any) -> None:
    from mlxlite.engine import quantize  # lazy: mlx only when `create --quantize` runs

    quantize.quantize_model(source, qtype, out, say)


def cmd_create(args: Any) -> int:
    qtype = parse_quantize_type(args.quantize) if getattr(args, "quantize", None) else None
    mf, base_dir = _read_modelfile(args.file)
    try:
        create(Store(), args.name, replace(spec_from_modelfile(mf), quantize=qtype), base_dir=base_dir,
               say=lambda line: print(line, flush=True), quantizer=_quantizer)
    except MlxliteError as exc:
        raise _located(mf, args.file, exc) from None
    return 0


def cmd_validate(args: Any) -> int:
    mf, base_dir = _read_modelfile(args.file)
    try:
        summary = check(Store(), spec_from_modelfile(mf), base_dir)
    except MlxliteError as exc:
        raise _located(mf, args.file, exc) from None
    kinds = sorted({type(i).__name__.upper() for i in mf.instructions})
    print(f"ok: {len(mf.instructions)} instructions ({', '.join(kinds)}); {summary}")
    return 0
