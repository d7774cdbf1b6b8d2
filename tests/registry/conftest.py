"""Registry fixtures: every database test runs on SQLite and (when configured) PostgreSQL."""

from __future__ import annotations

import os

import pytest

from registry import init_registry, open_registry, register_tree
from tests.registry.helpers import PG_ENV, database_url, demo_tree

BACKENDS = [
    "sqlite",
    pytest.param(
        "postgresql",
        marks=[pytest.mark.postgres, pytest.mark.skipif(not os.environ.get(PG_ENV), reason=f"{PG_ENV} is not set")],
    ),
]


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def db_url(backend, tmp_path):
    """An empty database (no schema yet) of the parametrized backend."""
    with database_url(backend, tmp_path) as url:
        yield url


@pytest.fixture
def reg(db_url):
    """An initialised, empty registry."""
    init_registry(db_url)
    registry = open_registry(db_url)
    yield registry
    registry.close()


@pytest.fixture
def demo_reg(reg):
    """A registry holding the demo-shaped tree over SmolLM2's architecture."""
    register_tree(reg, demo_tree())
    return reg
