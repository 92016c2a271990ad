"""mlxlite: a local LLM runner on MLX. This module holds the version only and imports nothing heavy."""

__version__ = "0.1.0"
