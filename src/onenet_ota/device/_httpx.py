"""An injected ``httpx2`` client as a device transport (proxies, custom TLS, mounts, mocks).

Imported only when a client is given an ``http_client``: the SDK itself does not need httpx2
(install the ``httpx`` extra for this). It answers the same results as
:mod:`onenet_ota.device.transport`, with httpx2's exceptions mapped to the same errors. It does
not pipeline: its calls go one after the other.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import httpx2

from onenet_ota.device._core import Call, Head
from onenet_ota.device._http import Failure, Result
from onenet_ota.device.errors import (
    OtaError,
    ProtocolError,
    RequestTimeout,
    TransportError,
    endpoint_label,
)

_HTTPX_ERRORS = (httpx2.HTTPError, httpx2.InvalidURL, httpx2.StreamError)


def _http_timeout(call: Call[Any]) -> httpx2.Timeout:
    timeout = call.request.timeout
    return httpx2.Timeout(timeout.seconds, connect=timeout.connect_seconds)


def _head(response: httpx2.Response) -> Head:
    return Head(
        response.status_code,
        tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in response.headers.raw),
    )


def _wrap(call: Call[Any], exc: Exception, *, got_head: bool) -> OtaError:
    """httpx2's exception as this SDK's; the result keeps it as the cause."""
    endpoint = call.endpoint
    detail = str(exc) or type(exc).__name__
    authorization = call.request.header("Authorization")
    if authorization:  # belt and braces: no library message may carry the credential out
        detail = detail.replace(authorization, "***")
    if isinstance(exc, httpx2.TimeoutException):
        return RequestTimeout(
            f"timed out after {call.request.timeout.ms} ms ({type(exc).__name__})",
            endpoint=endpoint,
        )
    if isinstance(exc, httpx2.RemoteProtocolError):
        if got_head:
            # The status and headers arrived, the body did not match its framing: typically a
            # Content-Length larger than the bytes sent before the server closed.
            return ProtocolError(
                f"reply body does not match its framing: {detail}", endpoint=endpoint
            )
        if "without sending a response" in detail:
            return TransportError(
                "the server closed the connection without replying", endpoint=endpoint
            )
        return ProtocolError(f"reply is not valid HTTP/1.1: {detail}", endpoint=endpoint)
    return TransportError(f"{type(exc).__name__}: {detail}", endpoint=endpoint)


def _may_retry(exc: Exception, got_head: bool, retried: bool, deadline: float) -> bool:
    """Whether to send the request once more, on a new connection (see
    :mod:`onenet_ota.device.transport`: only when no reply byte arrived, never after a timeout).
    """
    if retried or got_head or time.monotonic() >= deadline:
        return False
    if isinstance(exc, httpx2.RemoteProtocolError):
        return "without sending a response" in str(exc)
    return isinstance(exc, httpx2.ReadError | httpx2.WriteError)


logger = logging.getLogger("onenet_ota.device")


def _log(call: Call[Any], status: int) -> None:
    logger.debug("%s: HTTP %s", endpoint_label(call.endpoint), status)


class HttpxTransport:
    """Sends through an ``httpx2.Client`` it does not own (nor close)."""

    def __init__(self, http: httpx2.Client, *, keep_alive: bool = True) -> None:
        self.http = http
        # Connection: close comes with the request (the core adds it for keep_alive False);
        # httpx2's pool then drops the connection the server closes.
        self._headers: list[tuple[str, str]] = []

    @property
    def http_closed(self) -> bool:
        """Whether the injected client was closed."""
        return self.http.is_closed

    def exchange(self, calls: Sequence[Call[Any]], *, pipeline: bool = False) -> list[Result]:
        """Each call in turn (httpx2 does not pipeline)."""
        return [self._one(call) for call in calls]

    def _one(self, call: Call[Any]) -> Result:
        request = call.request
        deadline = time.monotonic() + request.timeout.seconds
        retried = False
        while True:
            got_head = False
            try:
                with self.http.stream(
                    request.method,
                    request.url,
                    headers=[*request.headers, *self._headers],
                    content=request.body,
                    timeout=_http_timeout(call),
                ) as response:
                    got_head = True
                    _log(call, response.status_code)
                    reader = call.begin(_head(response))
                    for data in response.iter_raw():
                        reader.feed(data)
                        if time.monotonic() > deadline:
                            raise call.timeout_error()
                    return reader.finish()
            except OtaError as error:
                return Failure(error)
            except _HTTPX_ERRORS as exc:
                if _may_retry(exc, got_head, retried, deadline):
                    retried = True
                    continue
                return Failure(_wrap(call, exc, got_head=got_head), cause=exc)

    def close(self) -> None:
        """Nothing to release: the injected client is its owner's."""


class AsyncHttpxTransport:
    """Sends through an ``httpx2.AsyncClient`` it does not own (nor close)."""

    def __init__(self, http: httpx2.AsyncClient, *, keep_alive: bool = True) -> None:
        self.http = http
        # Connection: close comes with the request (the core adds it for keep_alive False);
        # httpx2's pool then drops the connection the server closes.
        self._headers: list[tuple[str, str]] = []

    @property
    def http_closed(self) -> bool:
        """Whether the injected client was closed."""
        return self.http.is_closed

    async def exchange(self, calls: Sequence[Call[Any]], *, pipeline: bool = False) -> list[Result]:
        """Each call in turn (httpx2 does not pipeline)."""
        return [await self._one(call) for call in calls]

    async def _one(self, call: Call[Any]) -> Result:
        request = call.request
        deadline = time.monotonic() + request.timeout.seconds
        retried = False
        while True:
            got_head = False
            try:
                async with self.http.stream(
                    request.method,
                    request.url,
                    headers=[*request.headers, *self._headers],
                    content=request.body,
                    timeout=_http_timeout(call),
                ) as response:
                    got_head = True
                    _log(call, response.status_code)
                    reader = call.begin(_head(response))
                    async for data in response.aiter_raw():
                        reader.feed(data)
                        if time.monotonic() > deadline:
                            raise call.timeout_error()
                    return reader.finish()
            except OtaError as error:
                return Failure(error)
            except _HTTPX_ERRORS as exc:
                if _may_retry(exc, got_head, retried, deadline):
                    retried = True
                    continue
                return Failure(_wrap(call, exc, got_head=got_head), cause=exc)

    async def aclose(self) -> None:
        """Nothing to release: the injected client is its owner's."""
