"""Endpoint paths and matching (spec §4.1, D20)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from onenet_ota.protocol.endpoints import METHODS, Endpoint, match_path, path_for

TOKEN = "ota_3fQ9cZr0LmT7wXa2bN5k"


@pytest.mark.parametrize(
    ("endpoint", "path"),
    [
        (Endpoint.POST_VERSION, "/ota/device/version"),
        (Endpoint.QUERY_VERSION, "/ota/device/version"),
        (Endpoint.CHECK_TASK, "/ota/south/check"),
        (Endpoint.TASKING, "/ota/south/tasking"),
        (Endpoint.CHECK_TOKEN, f"/ota/south/download/{TOKEN}/check"),
        (Endpoint.DOWNLOAD, f"/ota/south/download/{TOKEN}"),
        (Endpoint.REPORT_PROGRESS, f"/ota/south/device/download/{TOKEN}/progress"),
        (Endpoint.REPORT_RESULT, "/ota/south/report"),
        (Endpoint.DEV_INFO, "/ota/devInfo"),
    ],
)
def test_paths_and_matching(endpoint: Endpoint, path: str) -> None:
    assert path_for(endpoint, TOKEN) == path
    for candidate in (path, path + "/"):  # D20: one trailing slash is accepted
        route = match_path(candidate)
        assert route is not None
        for method in METHODS[endpoint]:
            assert route.by_method[method] is endpoint
        if endpoint in (Endpoint.CHECK_TOKEN, Endpoint.DOWNLOAD, Endpoint.REPORT_PROGRESS):
            assert route.token == TOKEN


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/ota",
        "/ota/south/download/",
        "/ota/south/download//check",
        "/ota/south/download/a/b",
        "/ota/south/device/download//progress",
        "/ota/device/version//",
        "/OTA/south/check",
        "/ota/south/check/x",
    ],
)
def test_unknown_paths(path: str) -> None:
    assert match_path(path) is None


def test_allow_header_values() -> None:
    version = match_path("/ota/device/version")
    check = match_path("/ota/south/check")
    assert version is not None
    assert check is not None
    assert version.allow == "GET, POST"
    assert check.allow == "GET"


def test_token_endpoints_need_a_token() -> None:
    with pytest.raises(ValueError, match="token"):
        path_for(Endpoint.DOWNLOAD)


@given(
    st.text(
        alphabet=st.characters(blacklist_characters="/", blacklist_categories=["Cs"]),
        min_size=1,
        max_size=30,
    )
)
def test_any_token_round_trips_through_path_and_match(token: str) -> None:
    from urllib.parse import unquote

    route = match_path(path_for(Endpoint.DOWNLOAD, token))
    assert route is not None
    assert route.token is not None
    assert unquote(route.token) == token
