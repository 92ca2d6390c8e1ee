"""A TCP proxy on loopback that a test can take down and bring back on the same port:
what clients see of a server that restarts (every connection cut, new ones refused), or
of a network that silently stops carrying packets (nothing answers, nothing is cut)."""

from __future__ import annotations

import contextlib
import socket
import threading

from tests.support.server import free_port


class TcpProxy:
    """Forwards ``127.0.0.1:port`` to ``127.0.0.1:target_port`` while it is up."""

    def __init__(self, target_port: int, port: int | None = None) -> None:
        self.target_port = target_port
        self.port = port or free_port()
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._silent = False

    def start(self) -> TcpProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        with self._lock:
            self._listener = listener
            self._silent = False
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def stop(self) -> None:
        """Refuse new connections and reset every open one."""
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._sockets = self._sockets, set()
            self._silent = False
        if listener is not None:
            # Shut down first: a close alone leaves the thread in accept() listening,
            # and the next client would still get through.
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for sock in sockets:
            _reset(sock)

    def go_silent(self) -> None:
        """A network partition: the open connections stay open but carry nothing more,
        either way, and nothing answers a new one (no reset, no refusal). :meth:`stop`
        then resets them, as a partition that lasts does in the end."""
        with self._lock:
            self._silent = True

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # stopped
            with self._lock:
                alive = self._listener is listener
                silent = alive and self._silent
                if silent:
                    self._sockets.add(client)  # held open, never answered
            if not alive:
                _reset(client)  # stop() ran since accept()
                continue
            if silent:
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                # stop() may have run since accept(): then this pair goes at once.
                alive = self._listener is listener
                if alive:
                    self._sockets |= {client, upstream}
            if not alive:
                _reset(client)
                _reset(upstream)
                continue
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                if not self._silent:
                    sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def _reset(sock: socket.socket) -> None:
    """End a connection at once: wake the threads blocked on it, then close it with a
    reset (a close alone waits for a thread still in recv() on it)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
