"""The modelfile wing: Ollama's Modelfile syntax, and building models from layers.

Owns `parser` (the Modelfile grammar: instructions with their positions, quoting, templates
checked as Go or jinja) and `build` (`create`: a base model's layers, shared, plus small new
layers for parameters, system, template, messages, licenses; `check` is `validate`;
`to_modelfile` prints what `create` takes back to the same digest) and `quantize` (`create
--quantize`'s types, and the base a quantized copy of the weights makes: the quantizing itself
is the engine's, handed in by the caller). Used by the CLI
(`create`, `validate`, `show --modelfile`) and `/api/create`. Imports the store, the
catalog (a FROM of a catalog name fetches it) and the ground floor; never imports mlx, the
scheduler or the server.
"""

from mlxlite.modelfile.build import (
    CreateSpec,
    check,
    create,
    normalize_params,
    read_json_layer,
    read_messages,
    read_params,
    settings_of,
    spec_from_modelfile,
    to_modelfile,
)
from mlxlite.modelfile.parser import (
    From,
    License,
    Message,
    Modelfile,
    ModelfileError,
    Parameter,
    Requires,
    System,
    Template,
    check_template,
    is_semver,
    parse,
)
from mlxlite.modelfile.quantize import TYPES as QUANTIZE_TYPES
from mlxlite.modelfile.quantize import Quantizer
from mlxlite.modelfile.quantize import parse_type as parse_quantize_type

__all__ = [
    "CreateSpec", "check", "create", "read_json_layer", "read_messages", "read_params", "settings_of", "spec_from_modelfile",
    "to_modelfile", "From", "License", "Message", "Modelfile", "ModelfileError", "Parameter", "Requires",
    "System", "Template", "parse", "normalize_params", "check_template", "is_semver",
    "QUANTIZE_TYPES", "Quantizer", "parse_quantize_type",
]
