"""A TCP proxy on an ephemeral 127.0.0.1 port for the cluster tests, which can
*freeze* the link: while frozen nothing is read or forwarded in either
direction and nothing new is accepted, but every socket stays open -- what a
node sees when packets are dropped (a partition, a firewall DROP, a dead
switch), unlike a refused or reset connection.  One thread; every wait bounded.
"""
from __future__ import annotations

import select
import socket
import threading


class FreezableProxy:
    """``FreezableProxy(target_port).start()``; ``.port``, ``.freeze()``,
    ``.resume()``, ``.stop()``."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.frozen = threading.Event()
        self._stop = threading.Event()
        self._peer = {}
        self._thread = threading.Thread(target=self._run, name="freezable-proxy", daemon=True)

    def start(self) -> "FreezableProxy":
        self._thread.start()
        return self

    def freeze(self) -> None:
        self.frozen.set()

    def resume(self) -> None:
        self.frozen.clear()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock in list(self._peer) + [self.listener]:
            try:
                sock.close()
            except OSError:
                pass

    def _close_pair(self, sock) -> None:
        other = self._peer.pop(sock, None)
        self._peer.pop(other, None)
        for s in (sock, other):
            if s is not None:
                try:
                    s.close()
                except OSError:
                    pass

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.frozen.is_set():
                self._stop.wait(0.02)
                continue
            readable, _, _ = select.select([self.listener] + list(self._peer), [], [], 0.05)
            for sock in readable:
                if self.frozen.is_set():
                    break
                if sock is self.listener:
                    client, _ = self.listener.accept()
                    try:
                        upstream = socket.create_connection(self.target, timeout=5)
                    except OSError:
                        client.close()
                        continue
                    self._peer[client] = upstream
                    self._peer[upstream] = client
                    continue
                if sock not in self._peer:
                    continue
                try:
                    data = sock.recv(1 << 16)
                except OSError:
                    data = b""
                if not data:
                    self._close_pair(sock)
                    continue
                try:
                    self._peer[sock].sendall(data)
                except OSError:
                    self._close_pair(sock)
