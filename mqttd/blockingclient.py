"""A minimal blocking MQTT 3.1.1 (or 5.0) client on the project's codec.

For tools, benchmarks and tests that need exact control over what goes on the
wire (pipelined PUBLISHes, counting every PUBACK); not for applications: no
reconnect, no keepalive, no threads.  Every wait is bounded by a timeout.
"""
from __future__ import annotations

import socket

from mqttd.codec import PacketReader, encode
from mqttd.codec.packets import NO_PROPERTIES, Connack, Connect, Disconnect


class BlockingClient:
    """``level`` 4 (3.1.1, default) or 5; ``properties`` go in the CONNECT."""

    def __init__(self, port: int, client_id: str, clean: bool = True,
                 host: str = "127.0.0.1", timeout: float = 30.0, level: int = 4,
                 properties=NO_PROPERTIES, username=None, password=None):
        self.level = level
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.reader = PacketReader(level=level)
        self.pending: list = []
        self.sock.sendall(encode(Connect(level, client_id, clean, 0, username, password,
                                         properties=properties), level))
        self.connack = self.next_packet(timeout)
        if not (isinstance(self.connack, Connack) and self.connack.reason_code == 0):
            raise ConnectionError(f"CONNECT refused: {self.connack!r}")

    def send(self, *packets) -> None:
        self.sock.sendall(b"".join(encode(p, self.level) for p in packets))

    def next_packet(self, timeout: float = 30.0):
        """The next packet from the broker; ``socket.timeout`` after ``timeout`` s."""
        self.sock.settimeout(timeout)
        while not self.pending:
            data = self.sock.recv(1 << 18)
            if not data:
                raise ConnectionError("closed by broker")
            self.pending.extend(self.reader.feed(data))
        return self.pending.pop(0)

    def close(self) -> None:
        """DISCONNECT (if the socket still works) and close."""
        try:
            self.sock.sendall(encode(Disconnect(), self.level))
        except OSError:
            pass
        self.sock.close()
