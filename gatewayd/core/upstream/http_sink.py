"""The HTTP sink: POST one encoded batch to `{url}/v1/batch` and classify the answer."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx

from ...protocol.batch import EncodedBatch
from ...protocol.retry import Outcome, parse_response

__all__ = ["HttpSink"]

#: httpcore's trace events once the request is written, or failed to be ("http11." / "http2." first).
_BODY_WRITTEN = (".send_request_body.complete", ".send_request_body.failed")


class HttpSink:
    """Sends batches over HTTP(S) with httpx (which runs under trio).

    Transport failures (refused, reset, timeout, TLS) come back as a `retry`
    Outcome with status 0; answers are classified by `parse_response`. Redirects are
    not followed: a 3xx means a misconfigured URL, and the data waits (retry).
    """

    kind = "http"

    def __init__(
        self,
        name: str,
        url: str,
        *,
        path: str = "/v1/batch",
        timeout_s: float = 30.0,
        verify: bool | str = True,
        clock: Callable[[], float] = time.time,
    ):
        self.name = name
        self.path = path  # appended to `url`: named in the alarm when the endpoint is missing (404)
        self.endpoint = url.rstrip("/") + path
        self.clock = clock
        self._timeout_s = timeout_s
        self._verify = verify
        self._client = self._new_client()

    def _new_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            timeout=httpx.Timeout(self._timeout_s), follow_redirects=False, verify=self._verify,
            headers={"User-Agent": "gatewayd"},
        )

    async def send(self, batch: EncodedBatch, *, sent: Callable[[], None] = lambda: None) -> Outcome:
        """POST the batch; never raises for network trouble (that is a `retry`).

        `sent()` is called once the request body is written (httpcore's `trace` extension;
        not for the CONNECT request of an HTTPS proxy, which goes through it too). A sink
        closed by `aclose` (a worker restarted after a crash) opens a new client.
        """
        connect = False

        async def trace(event: str, info: dict) -> None:
            nonlocal connect
            if event.endswith(".send_request_headers.started"):
                connect = getattr(info.get("request"), "method", None) == b"CONNECT"
            elif event.endswith(_BODY_WRITTEN) and not connect:
                sent()

        if self._client.is_closed:
            self._client = self._new_client()
        try:
            response = await self._client.post(self.endpoint, content=batch.body, headers=batch.headers,
                                               extensions={"trace": trace})
        except httpx.HTTPError as e:  # connect/read/write errors and timeouts
            return Outcome("retry", 0, reason=f"{type(e).__name__}: {e or 'no detail'}")
        return parse_response(response.status_code, response.headers, response.content, now=self.clock())

    async def aclose(self) -> None:
        await self._client.aclose()

    def describe(self) -> str:
        return self.endpoint
