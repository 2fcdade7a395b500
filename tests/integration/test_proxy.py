"""The fault-injection proxy forwards, stalls without losing bytes, and resets like a restart."""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
from collections.abc import Iterator

import psycopg2
import pytest
import redis
from sqlalchemy.engine import make_url

from tests.proxy import TcpProxy
from tests.servers import PostgresServer, RedisServer, wait_for

NOTHING_ARRIVES_S = 0.3  # how long a probe listens for bytes that must not come
DEADLINE_S = 5.0


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        with contextlib.suppress(OSError):
            while data := self.request.recv(65536):
                self.request.sendall(data)


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A tiny echo server on a free loopback port."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(DEADLINE_S)


@pytest.fixture
def proxy(echo_port: int) -> Iterator[TcpProxy]:
    with TcpProxy(echo_port) as running:
        yield running


@contextlib.contextmanager
def client(port: int) -> Iterator[socket.socket]:
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S) as sock:
        yield sock


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    return data


def nothing_arrives(sock: socket.socket) -> bool:
    sock.settimeout(NOTHING_ARRIVES_S)
    try:
        sock.recv(1)
    except TimeoutError:
        return True
    finally:
        sock.settimeout(DEADLINE_S)
    return False


def was_reset(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def new_connection_is_reset(port: int) -> bool:
    # The reset may come before connect() has returned, or on the first read after it.
    try:
        with client(port) as sock:
            return was_reset(sock)
    except ConnectionResetError:
        return True


def test_bytes_flow_both_ways(proxy: TcpProxy):
    # Given a client connected through the proxy to an echo server
    with client(proxy.port) as sock:
        # When it sends, in chunks larger than one read
        payload = bytes(range(256)) * 1024
        sock.sendall(payload)

        # Then everything comes back, in order, and the proxy counts it
        assert recv_exactly(sock, len(payload)) == payload
        assert proxy.connections == 1
        wait_for(lambda: proxy.bytes_forwarded == 2 * len(payload), DEADLINE_S, "byte count")
    wait_for(lambda: proxy.connections == 0, DEADLINE_S, "the closed connection to go")


def test_pause_stalls_open_and_new_connections_and_resume_delivers_what_was_held(
    proxy: TcpProxy,
):
    # Given a connection that has already carried an echo
    with client(proxy.port) as old:
        old.sendall(b"warm")
        assert recv_exactly(old, 4) == b"warm"

        # When the proxy is paused and bytes are sent on it and on a new connection
        proxy.pause()
        forwarded = proxy.bytes_forwarded
        with client(proxy.port) as new:
            old.sendall(b"held-1")
            old.sendall(b"held-2")
            new.sendall(b"new")
            wait_for(lambda: proxy.connections == 2, DEADLINE_S, "the new connection")

            # Then nothing comes back, yet both connections stay open
            assert nothing_arrives(old)
            assert nothing_arrives(new)
            assert proxy.connections == 2
            assert proxy.bytes_forwarded == forwarded

            # And after resume the held bytes arrive, in order
            proxy.resume()
            assert recv_exactly(old, 12) == b"held-1held-2"
            assert recv_exactly(new, 3) == b"new"


def test_pause_stalls_the_server_to_client_direction_too():
    # Given a client and a server connected through the proxy, the test holding both ends
    with (
        socket.create_server(("127.0.0.1", 0)) as listener,
        TcpProxy(listener.getsockname()[1]) as proxy,
        client(proxy.port) as sock,
    ):
        listener.settimeout(DEADLINE_S)
        upstream, _ = listener.accept()
        with upstream:
            # When the proxy is paused and the server sends
            proxy.pause()
            upstream.sendall(b"from-server")

            # Then the client gets nothing until resume, then all of it
            assert nothing_arrives(sock)
            proxy.resume()
            assert recv_exactly(sock, 11) == b"from-server"


def test_cut_resets_connections_until_resume(proxy: TcpProxy):
    # Given an open connection that works
    with client(proxy.port) as old:
        old.sendall(b"ok")
        assert recv_exactly(old, 2) == b"ok"

        # When the proxy cuts
        proxy.cut()

        # Then the open connection is reset, and so is one made during the cut
        assert was_reset(old)
        assert new_connection_is_reset(proxy.port)
        wait_for(lambda: proxy.connections == 0, DEADLINE_S, "no live connections")

    # And after resume new connections work again
    proxy.resume()
    with client(proxy.port) as after:
        after.sendall(b"back")
        assert recv_exactly(after, 4) == b"back"


@pytest.mark.postgres
def test_postgres_client_sees_a_cut_as_a_lost_server(postgres_server: PostgresServer):
    with TcpProxy(postgres_server.port) as proxy:
        # Given a psycopg2 connection through the proxy that answers queries
        dsn = make_url(postgres_server.dsn()).set(drivername="postgresql", port=proxy.port)
        libpq_dsn = dsn.render_as_string(hide_password=False)
        with contextlib.closing(psycopg2.connect(libpq_dsn)) as conn, conn.cursor() as cur:
            cur.execute("SELECT 1, repeat('x', 200000)")
            assert cur.fetchone() == (1, "x" * 200000)

            # When the proxy cuts
            proxy.cut()

            # Then the next query fails the way a restarted server makes it fail
            with pytest.raises(psycopg2.OperationalError):
                cur.execute("SELECT 1")

        # And after resume a new connection works
        proxy.resume()
        with contextlib.closing(psycopg2.connect(libpq_dsn)) as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)


@pytest.mark.redis
def test_redis_command_sent_during_a_pause_completes_after_resume(redis_server: RedisServer):
    with TcpProxy(redis_server.port) as proxy:
        # Given a Redis client through the proxy that has stored a large value
        conn = redis.Redis(port=proxy.port, socket_timeout=DEADLINE_S)
        try:
            value = b"v" * 1_000_000
            conn.set("proxy-test", value)
            results: list[bytes | None] = []
            done = threading.Event()

            def read_back() -> None:
                results.append(conn.getdel("proxy-test"))  # type: ignore[arg-type]
                done.set()

            # When the link stalls and the client asks for the value
            proxy.pause()
            reader = threading.Thread(target=read_back, daemon=True)
            reader.start()

            # Then no answer comes until resume, and then the whole value does
            assert not done.wait(NOTHING_ARRIVES_S)
            proxy.resume()
            reader.join(DEADLINE_S)
            assert results == [value]
        finally:
            conn.close()
