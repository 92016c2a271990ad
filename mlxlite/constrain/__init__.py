"""The constrain wing: constrained decoding, without mlx.

Owns which tokens keep a generation a prefix of a document that `format` accepts ("json",
or a JSON Schema): `schema` compiles the supported subset into grammar nodes (and
validates a finished value), `regex` is the small engine behind `pattern`, `recognizer`
steps JSON byte by byte, `tokens.TokenConstraint` turns that into a numpy mask over the
vocabulary for the engine to apply. Pure Python and numpy; never imports mlx, the store,
or any wing above it.
"""

from mlxlite.constrain.schema import compile_spec, validate
from mlxlite.constrain.tokens import TokenConstraint, recognize

__all__ = ["TokenConstraint", "recognize", "compile_spec", "validate"]
