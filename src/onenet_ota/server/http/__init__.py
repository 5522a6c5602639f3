"""The server's HTTP/1.1 layer: request and response types, the asyncio server, TLS helper.

The device API needs exact control of the bytes on the wire (spec §2.5, §8.2): header-name casing,
header order, at most 10 headers, no Date/Server, and the one-byte download error in the same write
as the headers. No ASGI server offers that (spec §8.4), so the project owns this layer: httptools
parses, and responses are serialised here.

The package's parts (split the way uvicorn splits its own):

- :mod:`~onenet_ota.server.http.models`: :class:`Request`, :class:`Response`,
  :class:`FileSegment`, the body errors, and :class:`Limits`, every bound on a client as one
  frozen value;
- :mod:`~onenet_ota.server.http.encoding`: the response head, byte for byte; reason phrases; the
  layer's canned answers;
- :mod:`~onenet_ota.server.http.connection`: the per-connection protocol and its states;
- :mod:`~onenet_ota.server.http.server`: :class:`HttpServer`, its accept loop and lifecycle,
  :func:`serve`;
- :mod:`~onenet_ota.server.http.tls`: :func:`make_server_ssl_context`.

Importing from ``onenet_ota.server.http`` itself is the public way in; the names are re-exported
here.

Theory of operation
-------------------
One :class:`asyncio.Protocol` per connection feeds received bytes to an httptools parser. Each
parsed request head becomes a :class:`Request` queued on its connection; a worker, alive only
while the queue is non-empty, calls the handler for each request in order (pipelining is answered
in order) and writes the :class:`Response`. The worker starts inside the callback that received
the bytes and becomes a task only if it has to wait (a body, a full socket buffer, a file sent
with sendfile), so that a request answered without waiting costs no task and no extra turn of
the event loop:

* The status line is ``HTTP/1.1 <code> <reason>``; headers go out in the given order and casing.
  The layer adds nothing but a ``Connection`` header when the handler set none: ``close`` when the
  connection closes after this response, or ``keep-alive`` when an HTTP/1.0 client asked to keep
  it and it stays open (an HTTP/1.0 client closes unless told otherwise, RFC 9112 §9.3). It goes
  before ``Content-Range`` if there is one (which must stay last, §6.6.3/D8), else last. The layer
  never adds ``keep-alive`` to HTTP/1.1 (persistent by default; D26); a chunked body to an
  HTTP/1.0 client closes the connection, since such a client cannot find the end of it.
* The header block and a ``bytes`` body leave in ONE ``transport.write`` (D7: the one-byte download
  error must share its TCP segment with the headers). A :class:`FileSegment` of at most 64 KiB is
  read with ``os.pread`` *before* anything is written and goes out in the same single write; a
  larger one is written with ``loop.sendfile`` after the headers.
* A HEAD request reaches the handler like any other (``Request.method`` is ``"HEAD"``; handlers
  answer it as GET, RFC 9110 §9.3.2). The layer writes that response's head, ``Content-Length``
  included, and never its body: a file segment is not opened, and a body without framing does
  not close the connection.
* If a file segment cannot be read before anything is sent, the segment's ``fallback`` response is
  sent instead (the device API passes its byte-4 reply, §6.6 step 6); without a fallback the layer
  answers 500. If a large segment fails after the headers went out, the connection is aborted, so
  the client sees a body shorter than ``Content-Length``.

The limits named below are the fields of :class:`Limits`.

The request body is pulled by the handler (:meth:`Request.stream`, :meth:`Request.body`). Body bytes
are buffered per connection up to ``buffer_limit``; past it the layer stops reading the socket
until the handler consumes (flow control), so an upload never sits in memory whole. A body the
handler leaves unread is discarded before the next request if at most ``drain_limit`` bytes remain;
otherwise the response carries ``Connection: close`` and the connection closes.

What the layer itself answers (canonical form, §2.5, §4.3): invalid HTTP, an oversized head, or a
broken body framing (also a transfer coding list whose last coding is not ``chunked``, RFC 9112
§6.3) -> ``400`` with ``Content-Length: 0`` and ``Connection: close``; a transfer coding other than
``chunked`` in front of it (``gzip, chunked``: the layer cannot decode it, §6.1) -> ``501``, same
form, without calling the handler; a request head not complete within ``header_timeout`` ->
``408``, same form (after the response in flight, if
any; when that one already announced the close, nothing more); a handler exception -> ``500`` with
an empty body (the traceback is logged, never sent).

Connections close after ``max_requests`` requests (1000, like OneNET, D19), when the client asks
(``Connection: close``, HTTP/1.0 without keep-alive), after ``idle_timeout`` seconds of quiet
between requests or while a body is awaited (silently when nothing of a next request has
arrived), and when a request head takes longer than ``header_timeout``.

No client can hold a connection for long by sending slowly: a head has ``header_timeout`` from
its first byte in total, and a body a deadline of ``body_timeout`` plus its length at
``body_min_rate`` bytes/s, counted from the first time the layer waits for it (a wait past it ->
``400`` and close). Bytes trickled in keep neither open. The server accepts connections itself
(not through asyncio's ``create_server``) so that it can count them: at most
``max_connections`` are open at once, TLS ones still in their handshake included (which gets
``handshake_timeout`` seconds); one accepted beyond that is closed at once. The default cap
stays well below the descriptor limit (:func:`default_max_connections`). Should accepting fail
anyway for want of descriptors, accepting pauses for ``ACCEPT_PAUSE_SECONDS`` and the failure is
logged once per ``ACCEPT_LOG_INTERVAL`` with a count, without a traceback
(:mod:`~onenet_ota.server.http.server`).

Closing while the client may still be sending (a body left unread, as in an early ``413``; a head
or bytes that will not be parsed) would make the kernel answer those bytes with a reset, which can
destroy the final response before the client reads it. Such a connection closes lingering: the
write side is shut down after the response (the client sees it and then end-of-file), incoming
bytes are read and dropped unbuffered for up to ``LINGER_SECONDS`` or ``LINGER_BYTES``,
and the connection closes when the client closes or either bound is reached. TLS cannot shut down
one direction (asyncio has no ``write_eof`` there), so a TLS connection just closes once written.
:meth:`HttpServer.close` stops accepting, lets in-flight responses finish (with ``Connection:
close``) for up to ``grace`` seconds, then aborts what is left.

A connection's life is one named state (:class:`~onenet_ota.server.http.connection.State`), moved
only along a table of legal transitions; anything else raises ``StateError`` ("can't go to X in
state Y"), a bug in the layer, never a client's doing::

    IDLE -> RECV_HEAD -> RECV_BODY -> HANDLING -> IDLE (or RECV_HEAD: a pipelined head)
    any of those -> MUST_CLOSE -> LINGER -> CLOSED   (or MUST_CLOSE -> CLOSED; any -> CLOSED)

``IDLE`` runs the idle timer, ``RECV_HEAD`` the header timer; ``RECV_BODY`` bounds each wait of
the handler for body bytes; ``HANDLING`` runs no timer (the handler owns the time). ``MUST_CLOSE``
reads no further request: the responses owed go out, then the connection closes, lingering when
the client may still be sending.

Entry points: :class:`HttpServer` (start / serve_forever / close), :func:`serve` (one coroutine,
for worker processes sharing a pre-bound socket), :func:`new_event_loop` and
:func:`make_server_ssl_context`. (The tests run servers in a background thread with their own
harness, ``tests/serverthread.py``.)
"""

from onenet_ota.server.http.connection import SMALL_SEGMENT
from onenet_ota.server.http.encoding import REASONS
from onenet_ota.server.http.models import (
    BodyTooLarge,
    FileSegment,
    Handler,
    Limits,
    Request,
    RequestAborted,
    RequestTimedOut,
    Response,
    Stream,
    default_max_connections,
)
from onenet_ota.server.http.server import HttpServer, LogThrottle, new_event_loop, serve
from onenet_ota.server.http.tls import C_SDK_CIPHERS, make_server_ssl_context

__all__ = [
    "C_SDK_CIPHERS",
    "REASONS",
    "SMALL_SEGMENT",
    "BodyTooLarge",
    "FileSegment",
    "Handler",
    "HttpServer",
    "Limits",
    "LogThrottle",
    "Request",
    "RequestAborted",
    "RequestTimedOut",
    "Response",
    "Stream",
    "default_max_connections",
    "make_server_ssl_context",
    "new_event_loop",
    "serve",
]
