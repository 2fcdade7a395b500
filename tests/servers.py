"""Throwaway Redis and PostgreSQL servers on free loopback ports, for tests and benchmarks."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import redis
from pytest_httpserver import HTTPServer


class ServerMissing(RuntimeError):
    """A server binary this test needs is not installed."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.05):  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # the condition may raise until it holds
            last_exc = exc
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s}s waiting for {what} (last error: {last_exc})")


def _stop(proc: subprocess.Popen[bytes], timeout_s: float = 10) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout_s)


@dataclass
class RedisServer:
    port: int
    proc: subprocess.Popen[bytes] | None = None
    dir: str = ""

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise ServerMissing("redis-server is not installed")
        self.dir = self.dir or tempfile.mkdtemp(prefix="gt-redis-")
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                "--loglevel",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        wait_for(client.ping, 10, "redis to answer")
        client.close()

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
            self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


def _pg_bindir() -> Path:
    initdb = shutil.which("initdb")
    if initdb:
        return Path(os.path.realpath(initdb)).parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise ServerMissing("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    return Path(found[-1]).parent


@dataclass
class PostgresServer:
    port: int
    datadir: str = ""
    _as_user: tuple[str, ...] = ()

    def _run(self, *args: str) -> None:
        subprocess.run([*self._as_user, *args], check=True, capture_output=True)

    def start(self) -> None:
        bindir = _pg_bindir()
        base = tempfile.mkdtemp(prefix="gt-pg-")
        self.datadir = str(Path(base) / "data")
        if os.geteuid() == 0:
            # PostgreSQL refuses to run as root; use the distribution's postgres user.
            self._as_user = ("runuser", "-u", "postgres", "--")
            shutil.chown(base, "postgres")
        self._run(
            str(bindir / "initdb"),
            "-D",
            self.datadir,
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        opts = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={base} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=300"
        )
        self._run(
            str(bindir / "pg_ctl"),
            "-D",
            self.datadir,
            "-o",
            opts,
            "-w",
            "-t",
            "30",
            "-l",
            str(Path(base) / "log"),
            "start",
        )

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{dbname}"

    def _admin(self, sql: str) -> None:
        conn = psycopg2.connect(
            host="127.0.0.1", port=self.port, user="postgres", dbname="postgres"
        )
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
        finally:
            conn.close()

    def create_database(self, template: str | None = None) -> str:
        name = f"gt_{uuid.uuid4().hex[:12]}"
        self._admin(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        return name

    def drop_database(self, name: str) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        if self.datadir:
            with contextlib.suppress(subprocess.CalledProcessError):
                self._run(
                    str(_pg_bindir() / "pg_ctl"),
                    "-D",
                    self.datadir,
                    "-m",
                    "immediate",
                    "-w",
                    "stop",
                )
            shutil.rmtree(Path(self.datadir).parent, ignore_errors=True)
            self.datadir = ""


@contextlib.contextmanager
def running_redis() -> Iterator[RedisServer]:
    server = RedisServer(free_port())
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.dir, ignore_errors=True)


@contextlib.contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    server = PostgresServer(free_port())
    try:
        server.start()
        yield server
    finally:
        server.stop()


def serving_http(srv: HTTPServer) -> Iterator[HTTPServer]:
    """Run a pytest-httpserver server for the duration of a generator fixture."""
    srv.start()
    try:
        yield srv
    finally:
        srv.clear()
        if srv.is_running():
            srv.stop()


def self_signed_cert(directory: Path, name: str, alt_name: str) -> tuple[Path, Path]:
    """A throwaway certificate and key for ``name`` (``alt_name``: "DNS:x" or "IP:y")."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN={name}",
            "-addext",
            f"subjectAltName={alt_name}",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key
