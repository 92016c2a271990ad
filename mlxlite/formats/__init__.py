"""The formats wing: pure readers of the formats models arrive in, with no I/O policy.

Owns the GGUF header, metadata and tensor table (`gguf`), the per-architecture maps onto
mlx-lm's model classes (`archs/`, one module per family), the tokenizer spec from GGUF
metadata (`vocab`), chat templates (`templates`: the model's jinja template in a sandbox or
Ollama's Go template, fallbacks, prompt assembly; `jinja_bounds`: the steps, output and
`*`/`**` limits of one jinja render), Go's text/template language
(`gotemplate`: lexer, parser, executor), tool calls in generated text (`tools`),
thinking sections in it (`thinking`) and gpt-oss's harmony channels (`harmony`). Callers use the modules (`gguf.read_gguf(path)`) and
the types exported here. Imports only the standard library, jinja2/tokenizers where a
function needs them, and the ground floor; never imports mlx, the store, or any wing above
it.
"""

from mlxlite.formats import gguf, gotemplate, harmony, templates, thinking, tools
from mlxlite.formats.gguf import Header, TokenizerSpec
from mlxlite.formats.templates import ChatTemplate, GoChatTemplate
from mlxlite.formats.thinking import ThinkingParser
from mlxlite.formats.tools import ToolCallParser

__all__ = ["gguf", "gotemplate", "harmony", "templates", "thinking", "tools", "Header", "TokenizerSpec", "ChatTemplate",
           "GoChatTemplate", "ThinkingParser", "ToolCallParser"]
