"""Fixtures for integration tests: a local HTTP server on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from celery import Celery
from pytest_httpserver import HTTPServer

from gathering_tasks.app import celery_config
from gathering_tasks.settings import Settings
from tests.servers import serving_http


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
def celery_app(settings: Settings) -> Iterator[Celery]:
    """A Celery app configured like ours, publishing to the test Redis."""
    app = Celery("gathering-tests", set_as_current=False)
    app.conf.update(celery_config(settings))
    yield app
    app.close()
