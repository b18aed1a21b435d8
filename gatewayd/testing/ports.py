"""TCP ports for tests: one picked now stays ours until a server of the test binds it.

A port picked by binding port 0 and closing the socket is free only for that moment:
before mosquitto or a gateway (often a subprocess) binds it, any other bind to port 0
or outgoing connection on the machine (other tests, other suites) may be handed the same
port (time of check to time of use). :func:`reserved_port` leaves the port it picked in
TIME_WAIT instead (Yelp's ephemeral-port-reserve does the same): for about a minute the
kernel hands it to no bind of port 0, and no socket without SO_REUSEADDR can bind it,
while a server that sets SO_REUSEADDR (mosquitto, trio's listeners, so gatewayd's HTTP
and MQTT listeners, ``socketserver``, ``http.server``) binds it at once. Within one test
process a port is also never handed out twice.
"""

from __future__ import annotations

import socket
import threading

__all__ = ["reserved_port"]

_handed_out: set[tuple[str, int]] = set()
_lock = threading.Lock()


def reserved_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing else takes before a server of the test binds it
    with SO_REUSEADDR (see the module's docstring)."""
    while True:
        port = _reserve(host)
        with _lock:
            if (host, port) not in _handed_out:
                _handed_out.add((host, port))
                return port


def _reserve(host: str) -> int:
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((host, 0))
        server.listen(1)
        port = int(server.getsockname()[1])
        with socket.create_connection((host, port)) as client:
            accepted, _ = server.accept()
            # The side that closes first keeps the TIME_WAIT: ours, on the picked port.
            accepted.close()
            client.recv(1)  # until the close has reached the client: the order is settled
    return port
