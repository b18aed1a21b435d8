"""The address devices reach the gateway's HTTP listener at, for URLs handed to them."""

from __future__ import annotations

import socket
from collections.abc import Callable
from urllib.parse import urlsplit

from ..logs import get_logger
from ..schema import Address

__all__ = ["PublicUrl", "default_route_address"]

log = get_logger("gatewayd.http")
WILDCARDS = frozenset({"0.0.0.0", "::", ""})


class PublicUrl:
    """The base URL devices reach the main listener at, for the URLs the gateway hands out.

    `http.public_url` when set. Otherwise derived from `http.listen` as bound (port 0
    becomes the port hypercorn picked): a wildcard host (`0.0.0.0`, `::`) is no address
    a device can use, so it becomes the address of the interface that holds the default
    route (where the LAN usually is), logged once as a warning naming the key to set. Never
    the request's `Host` header: any client sets that, and a device must not be sent to
    a host of an attacker's choosing.
    """

    def __init__(self, configured: str, listen: Address, bound: Callable[[], list[str]] = list):
        self.configured = configured
        self.listen = listen
        self.bound = bound  # the main listener's URLs once it is bound, e.g. ["http://127.0.0.1:8080"]
        self._derived: str | None = None

    def __call__(self) -> str:
        if self.configured:
            return self.configured
        if self._derived is None:
            port = next((p for p in (urlsplit(url).port for url in self.bound()) if p), self.listen.port)
            if not port:
                raise RuntimeError("http.listen asks for any free port and the listener is not bound yet")
            self._derived = self._derive(port)
        return self._derived

    def _derive(self, port: int) -> str:
        host = self.listen.host
        if host not in WILDCARDS:
            return _http_url(host, port)
        address = default_route_address(ipv6=host == "::")
        url = _http_url(address, port)
        log.warning("http.public_url is not set and http.listen is a wildcard address: device URLs (OTA) use "
                    "the address of the default route; set http.public_url if devices reach the gateway "
                    "at another address", listen=str(self.listen), public_url=url)
        return url


def _http_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def default_route_address(*, ipv6: bool = False) -> str:
    """This host's source address towards the default route; the loopback address if none.

    Connecting a UDP socket only picks a route: nothing is sent. The destinations are
    documentation addresses (RFC 5737, RFC 3849), never contacted.
    """
    tries = [(socket.AF_INET6, "2001:db8::1"), (socket.AF_INET, "192.0.2.1")] if ipv6 else \
        [(socket.AF_INET, "192.0.2.1")]
    for family, destination in tries:
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.connect((destination, 9))
                return probe.getsockname()[0]
        except OSError:
            continue
    return "127.0.0.1"
