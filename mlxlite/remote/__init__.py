"""The remote wing: models that come from, or go to, somewhere else.

Owns the OCI distribution client (`registry`: auth, manifests, blobs, uploads),
resumable parallel verified downloads and their durable journal (`download`, `partial`),
Hugging Face repos (`hub`), the built-in catalog of short names (`catalog`), and the
dispatch of `pull` and `push` (`transfer`), which report progress in Ollama's event
shapes (`progress.py`). Every byte lands through the store's verified writers. Imports
the store and the ground floor; never imports mlx, the scheduler or the server.
"""

from mlxlite.remote.registry import check_url
from mlxlite.remote.transfer import pull, push

__all__ = ["check_url", "pull", "push"]
