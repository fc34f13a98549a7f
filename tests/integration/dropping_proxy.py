"""A real TCP proxy between the engine and PostgreSQL that cuts the client side at a chosen message.

It parses the client's protocol messages. On the connection whose transaction ran a query holding
MARKER, it forwards either the COMMIT (drop="commit": the server goes on committing, the client
never hears back) or the marked query itself (drop="marked": the server goes on running it) and
then closes the client side at once; the server side stays open as after a network cut, so the
server session lives on until it next writes to its client.
"""

from __future__ import annotations

import socket
import struct
import threading

MARKER = b"commit_lost_marker"


class DroppingProxy:
    """127.0.0.1:<port> -> PostgreSQL; drops the client after forwarding the COMMIT of a marked transaction
    (drop="commit") or the marked query (drop="marked")."""

    def __init__(self, pg_port, drop="commit"):
        assert drop in ("commit", "marked")
        self.pg_port = pg_port
        self.drop = drop
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.fired = threading.Event()
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self):
        self.stopped = True
        self.listener.close()

    def _accept(self):
        while not self.stopped:
            try:
                client, _addr = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.pg_port))
            threading.Thread(target=self._server_to_client, args=(server, client), daemon=True).start()
            threading.Thread(target=self._client_to_server, args=(client, server), daemon=True).start()

    @staticmethod
    def _server_to_client(server, client):
        try:
            while True:
                data = server.recv(65536)
                if not data:
                    break
                client.sendall(data)
        except OSError:
            pass
        finally:
            for s in (client, server):
                try:
                    s.close()
                except OSError:
                    pass

    def _client_to_server(self, client, server):
        buf = b""
        started = False  # the startup packet has no type byte
        marked = False
        try:
            while True:
                data = client.recv(65536)
                if not data:
                    break
                buf += data
                while True:
                    if not started:
                        if len(buf) < 4:
                            break
                        n = struct.unpack("!I", buf[:4])[0]
                        if len(buf) < n:
                            break
                        msg, buf = buf[:n], buf[n:]
                        started = True
                        server.sendall(msg)
                        continue
                    if len(buf) < 5:
                        break
                    n = struct.unpack("!I", buf[1:5])[0]
                    if len(buf) < 1 + n:
                        break
                    msg, buf = buf[:1 + n], buf[1 + n:]
                    kind, body = msg[:1], msg[5:]
                    if kind == b"Q" and MARKER in body:
                        marked = True
                    server.sendall(msg)
                    at = (kind == b"Q" and MARKER in body) if self.drop == "marked" else \
                        (kind == b"Q" and marked and body.strip(b"\0 ;").upper() == b"COMMIT")
                    if at and not self.fired.is_set():
                        self.fired.set()
                        # The message went to the server; the client never hears back.
                        client.shutdown(socket.SHUT_RDWR)
                        client.close()
                        return
        except OSError:
            pass
