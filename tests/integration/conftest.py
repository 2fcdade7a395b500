"""Fixtures for integration tests: a local HTTP server on 127.0.0.1."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from pytest_httpserver import HTTPServer

from tests.servers import serving_http

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def _shared_server() -> Iterator[HTTPServer]:
    # One server per module: stopping one takes half a second (werkzeug's poll interval).
    yield from serving_http(HTTPServer(host="127.0.0.1", port=0, threaded=True))


@pytest.fixture
def server(_shared_server: HTTPServer) -> Iterator[HTTPServer]:
    """The module's HTTP server, with no expectations left from other tests."""
    _shared_server.clear()
    yield _shared_server
    _shared_server.clear()


@pytest.fixture
def cli_env(db_url: str, redis_url: str) -> dict[str, str]:
    """The environment of a CLI subprocess on the test's database and Redis."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATHERING_")}
    env.update(GATHERING_DATABASE_URL=db_url, GATHERING_REDIS_URL=redis_url, PYTHONPATH=str(ROOT))
    return env
