"""E6's Range handling over HTTP: Appendix B.3 as a table (spec §6.6.1-§6.6.3, D8).

The package is 100 bytes (L = 100); each case sends one ``Range`` value over a raw socket and
checks status, ``Content-Range``, ``Content-Length`` and the exact bytes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from onenet_ota.server.blobs import BlobStore
from tests.server.seed import (
    DB_PARAMS,
    FakeClock,
    RawReply,
    Seeder,
    issue_token,
    module_database,
    raw_exchange,
    running_api,
)
from tests.serverthread import ServerThread

L100 = bytes(range(100))


@pytest.fixture(scope="module", params=DB_PARAMS)
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerThread, str]]:
    """A server and the token of a task whose package is the 100 bytes 0..99."""
    with module_database(request, tmp_path_factory) as engine:
        yield from _serve(engine, tmp_path_factory.mktemp("blobs"))


def _serve(engine: Engine, root: Path) -> Iterator[tuple[ServerThread, str]]:
    clock = FakeClock()
    seeder = Seeder(engine, BlobStore(root), clock)
    w = seeder.world(package_options={"data": L100, "file_name": "l100.bin"})
    with running_api(engine, seeder.blobs, clock) as (_, srv):
        yield srv, issue_token(srv.url, w)


def get(srv: ServerThread, token: str, *range_values: str) -> RawReply:
    lines = [f"GET /ota/south/download/{token} HTTP/1.1", "Host:ota.heclouds.com"]
    lines += [f"Range:{value}" for value in range_values]
    return raw_exchange(srv.port, ("\r\n".join(lines) + "\r\n\r\n").encode())


# Appendix B.3: Range value -> (first, last) served with 206, or None for 200 with the whole file.
B3: list[tuple[str, tuple[int, int] | None]] = [
    ("0-9", (0, 9)),
    ("bytes=0-9", (0, 9)),
    ("BYTES = 0 - 9", (0, 9)),
    ("007-010", (7, 10)),
    ("5-5", (5, 5)),
    ("90-199", (90, 99)),
    ("150-200", (0, 99)),
    ("50-10", (0, 10)),
    ("0-", (0, 99)),
    ("95-", (95, 99)),
    ("100-", (0, 99)),
    ("-10", (90, 99)),
    ("-500", (0, 99)),
    ("0-99999999999999999999999", (0, 99)),
    ("-0", None),
    ("-", None),
    ("0-9,20-29", None),
    ("items=0-9", None),
    ("bytes=x", None),
    # Beyond the table: the grammar's optional whitespace and a few more malformed forms.
    ("\t 1-2 \t", (1, 2)),
    ("bytes=-1", (99, 99)),
    ("99-", (99, 99)),
    ("999999999999999999999-", (0, 99)),
    ("1-2-3", None),
    ("+1-2", None),
    ("", None),
    ("bytes 0-9", None),
]


@pytest.mark.parametrize(("value", "expected"), B3, ids=[repr(v) for v, _ in B3])
def test_appendix_b3(
    served: tuple[ServerThread, str], value: str, expected: tuple[int, int] | None
) -> None:
    srv, token = served
    reply = get(srv, token, value)
    names = [name for name, _ in reply.headers]
    if expected is None:
        assert reply.status_line == "HTTP/1.1 200 OK"
        assert reply.body == L100
        assert "Content-Range" not in names
        assert reply.header("Content-Length") == "100"
    else:
        first, last = expected
        assert reply.status_line == "HTTP/1.1 206 Partial Content"
        assert reply.header("Content-Range") == f"bytes {first}-{last}/100"
        assert reply.header("Content-Length") == str(last - first + 1)
        assert reply.body == L100[first : last + 1]
        assert names[-1] == "Content-Range"  # always last (§6.6.3)
    assert reply.header("Content-Disposition") == 'attachment; filename="l100.bin"'


def test_no_range_is_200_whole_file(served: tuple[ServerThread, str]) -> None:
    srv, token = served
    reply = get(srv, token)
    assert reply.status_line == "HTTP/1.1 200 OK"
    assert reply.body == L100


def test_two_range_headers_are_malformed(served: tuple[ServerThread, str]) -> None:
    srv, token = served
    reply = get(srv, token, "0-9", "10-19")
    assert reply.status_line == "HTTP/1.1 200 OK"
    assert reply.body == L100
