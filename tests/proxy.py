"""A loopback TCP proxy that stalls or cuts the link to Redis or PostgreSQL on demand.

Fault-injection tests put it between a client and a real server to reproduce a network path
that silently drops packets (``pause``) and a server restarting under its clients (``cut``).
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
from typing import Literal

_CHUNK = 65536
_TIMEOUT_S = 5.0  # bound on connecting upstream, applying a mode change and stopping
_Mode = Literal["forward", "paused", "cut"]


def _abort(sock: socket.socket) -> None:
    """Close with SO_LINGER 0, so the peer gets an RST as from a crashed or restarted server."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class _Conn:
    """One proxied connection: both sockets, and bytes read from each not yet written on."""

    def __init__(self, client: socket.socket) -> None:
        self.client = client
        self.upstream: socket.socket | None = None  # None until forwarding is allowed
        self.buf: dict[socket.socket, bytearray] = {client: bytearray()}
        self.eof: set[socket.socket] = set()  # sockets that finished sending
        self.shut: set[socket.socket] = set()  # sockets whose EOF was passed on

    def peer(self, sock: socket.socket) -> socket.socket:
        return (self.upstream if sock is self.client else self.client) or sock


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to ``(target_host, target_port)``; one selector thread.

    Only the loop thread touches sockets. ``pause``/``resume``/``cut`` ask it for a mode and
    wait until it has applied it, so a test knows the fault is in place when the call returns.
    """

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self._target = (target_host, target_port)
        self._cond = threading.Condition()
        self._mode: _Mode = "forward"  # wanted, guarded by _cond
        self._wanted = self._applied = 0  # mode-change counters, guarded by _cond
        self._active: _Mode = "forward"  # in force; loop thread only
        self._conns: set[_Conn] = set()
        self._owner: dict[socket.socket, _Conn] = {}
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.connections = 0  # live proxied connections, including ones held while paused
        self.bytes_forwarded = 0  # written on to either side since start
        self.port = 0  # listening port, known once started

    def start(self) -> TcpProxy:
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = int(self._listener.getsockname()[1])
        self._wake_r, self._wake_w = socket.socketpair()
        self._sel = selectors.DefaultSelector()
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.setblocking(False)
        self._sel.register(self._listener, selectors.EVENT_READ)
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        with self._cond:
            self._active, self._applied = self._mode, self._wanted
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="tcp-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close every socket and join the loop thread; safe to call twice."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stopping.set()
        self._wake()
        thread.join(_TIMEOUT_S)
        if thread.is_alive():
            raise RuntimeError("the proxy thread did not stop")

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def pause(self) -> None:
        """Stall both directions, holding connections and bytes, like a black-holed path."""
        self._set("paused")

    def resume(self) -> None:
        """Forward again, held bytes first; also ends a cut."""
        self._set("forward")

    def cut(self) -> None:
        """Reset every connection, and new ones until ``resume``, like a restarting server."""
        self._set("cut")

    def _set(self, mode: _Mode) -> None:
        with self._cond:
            self._mode, self._wanted = mode, self._wanted + 1
            wanted = self._wanted
            if self._thread is None:
                return  # start() picks the mode up
            self._wake()
            if not self._cond.wait_for(lambda: self._applied >= wanted, _TIMEOUT_S):
                raise TimeoutError(f"the proxy did not switch to {mode}")

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # a full buffer already means "wake up"
            self._wake_w.send(b"x")

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                events = self._sel.select(timeout=0.2)
                self._apply()
                for key, mask in events:
                    self._handle(key.fileobj, mask)  # type: ignore[arg-type]
        finally:
            for conn in list(self._conns):
                self._close(conn, abort=True)
            for sock in (self._listener, self._wake_r, self._wake_w):
                sock.close()
            self._sel.close()

    def _apply(self) -> None:
        with self._cond:
            if self._applied == self._wanted:
                return
            self._active = self._mode
            for conn in list(self._conns):
                if self._active == "cut":
                    self._close(conn, abort=True)
                elif self._active == "forward" and conn.upstream is None:
                    self._connect(conn)
                self._refresh(conn)
            self._applied = self._wanted
            self._cond.notify_all()

    def _handle(self, sock: socket.socket, mask: int) -> None:
        if sock is self._wake_r:
            with contextlib.suppress(OSError):
                sock.recv(_CHUNK)
        elif sock is self._listener:
            self._accept()
        elif (conn := self._owner.get(sock)) is not None and self._active == "forward":
            try:
                if mask & selectors.EVENT_READ:
                    data = sock.recv(_CHUNK)
                    conn.buf[sock] += data
                    if not data:
                        conn.eof.add(sock)
                self._flush(conn, conn.client)
                self._flush(conn, conn.peer(conn.client))
            except OSError:  # a reset on one side is passed on to the other
                self._close(conn, abort=True)
            self._refresh(conn)

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except OSError:
            return
        if self._active == "cut":
            _abort(client)
            return
        client.setblocking(False)
        conn = _Conn(client)
        self._conns.add(conn)
        self._owner[client] = conn
        self.connections = len(self._conns)
        if self._active == "forward":
            self._connect(conn)
        self._refresh(conn)

    def _connect(self, conn: _Conn) -> None:
        try:
            upstream = socket.create_connection(self._target, timeout=_TIMEOUT_S)
        except OSError:  # target down: the client sees a reset, as it would without a proxy
            self._close(conn, abort=True)
            return
        upstream.setblocking(False)
        for sock in (conn.client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.upstream, conn.buf[upstream] = upstream, bytearray()
        self._owner[upstream] = conn

    def _flush(self, conn: _Conn, src: socket.socket) -> None:
        """Write what ``src`` sent on to its peer; pass its EOF on once all of it is out."""
        dst, buf = conn.peer(src), conn.buf[src]
        if buf:
            try:
                sent = dst.send(buf)
            except BlockingIOError:
                sent = 0
            del buf[:sent]
            self.bytes_forwarded += sent
        if src in conn.eof and not buf and src not in conn.shut:
            conn.shut.add(src)
            dst.shutdown(socket.SHUT_WR)
        if len(conn.shut) == 2:
            self._close(conn, abort=False)

    def _refresh(self, conn: _Conn) -> None:
        """Register for what the connection can do now: read where nothing waits, write where."""
        live = conn in self._conns and conn.upstream is not None and self._active == "forward"
        for sock in conn.buf:
            want = selectors.EVENT_READ if sock not in conn.eof and not conn.buf[sock] else 0
            want |= selectors.EVENT_WRITE if conn.buf[conn.peer(sock)] else 0
            if sock.fileno() >= 0:  # closed sockets left the selector when they were closed
                with contextlib.suppress(KeyError):
                    self._sel.unregister(sock)
            if live and want:
                self._sel.register(sock, want)

    def _close(self, conn: _Conn, *, abort: bool) -> None:
        if conn not in self._conns:
            return
        self._conns.discard(conn)
        self._refresh(conn)  # unregister before close, so a reused fd is never confused
        for sock in conn.buf:
            self._owner.pop(sock, None)
            if abort:
                _abort(sock)
            else:
                sock.close()
        self.connections = len(self._conns)
