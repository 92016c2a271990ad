"""Fixtures for the real default model (SmolLM2-135M-Instruct Q4_1 GGUF).

`default_gguf` is the verified file from the catalog's source (machine-wide cache, so it
is fetched once); `default_model` imports it into the test's own store.
"""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    from mlxlite.remote import catalog

    return catalog.fetch(catalog.CATALOG[catalog.DEFAULT_MODEL])


@pytest.fixture
def default_model(store, default_gguf) -> str:
    """The default model imported into this test's store; returns its name."""
    from mlxlite import names
    from mlxlite.remote import catalog
    from mlxlite.store.importers import import_gguf

    import_gguf(store, default_gguf, names.parse(catalog.DEFAULT_MODEL))
    return catalog.DEFAULT_MODEL
