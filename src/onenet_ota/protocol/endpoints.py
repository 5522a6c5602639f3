"""The classic API's endpoints E1-E9 (spec §4.1): methods, paths, and path matching."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from urllib.parse import quote


class Endpoint(Enum):
    """One classic device endpoint. ``value`` is its spec number."""

    POST_VERSION = "E1"
    QUERY_VERSION = "E2"
    CHECK_TASK = "E3"
    TASKING = "E4"
    CHECK_TOKEN = "E5"
    DOWNLOAD = "E6"
    REPORT_PROGRESS = "E7"
    REPORT_RESULT = "E8"
    DEV_INFO = "E9"

    @property
    def label(self) -> str:
        """``E3 check task``: how messages name the endpoint."""
        return f"{self.value} {_LABELS[self]}"


_LABELS = {
    Endpoint.POST_VERSION: "post version",
    Endpoint.QUERY_VERSION: "query version",
    Endpoint.CHECK_TASK: "check task",
    Endpoint.TASKING: "tasking",
    Endpoint.CHECK_TOKEN: "check token",
    Endpoint.DOWNLOAD: "download package",
    Endpoint.REPORT_PROGRESS: "report status",
    Endpoint.REPORT_RESULT: "report result",
    Endpoint.DEV_INFO: "devInfo",
}

VERSION_PATH = "/ota/device/version"  # E1 POST, E2 GET
CHECK_PATH = "/ota/south/check"  # E3
TASKING_PATH = "/ota/south/tasking"  # E4
DOWNLOAD_PREFIX = "/ota/south/download/"  # E5 ".../{token}/check", E6 ".../{token}"
PROGRESS_PREFIX = "/ota/south/device/download/"  # E7 ".../{token}/progress"
REPORT_PATH = "/ota/south/report"  # E8
DEV_INFO_PATH = "/ota/devInfo"  # E9

METHODS: dict[Endpoint, tuple[str, ...]] = {
    Endpoint.POST_VERSION: ("POST",),
    Endpoint.QUERY_VERSION: ("GET",),
    Endpoint.CHECK_TASK: ("GET",),
    Endpoint.TASKING: ("GET",),
    Endpoint.CHECK_TOKEN: ("GET",),
    Endpoint.DOWNLOAD: ("GET",),
    Endpoint.REPORT_PROGRESS: ("POST",),
    Endpoint.REPORT_RESULT: ("POST",),
    Endpoint.DEV_INFO: ("GET", "POST"),  # D18: OneNET documents GET with a body; others POST
}


def _token_segment(token: str) -> str:
    return quote(token, safe="")


def path_for(endpoint: Endpoint, token: str | None = None) -> str:
    """The request path of ``endpoint`` (without query); token endpoints need ``token``."""
    if endpoint in (Endpoint.POST_VERSION, Endpoint.QUERY_VERSION):
        return VERSION_PATH
    if endpoint is Endpoint.CHECK_TASK:
        return CHECK_PATH
    if endpoint is Endpoint.TASKING:
        return TASKING_PATH
    if endpoint is Endpoint.REPORT_RESULT:
        return REPORT_PATH
    if endpoint is Endpoint.DEV_INFO:
        return DEV_INFO_PATH
    if not token:
        raise ValueError(f"{endpoint.label} needs a download token")
    if endpoint is Endpoint.CHECK_TOKEN:
        return f"{DOWNLOAD_PREFIX}{_token_segment(token)}/check"
    if endpoint is Endpoint.DOWNLOAD:
        return f"{DOWNLOAD_PREFIX}{_token_segment(token)}"
    return f"{PROGRESS_PREFIX}{_token_segment(token)}/progress"


@dataclass(slots=True)  # not frozen: built for every request, and frozen init costs 2.5x
class Route:
    """A matched path: which endpoints live there (by method) and the path token, if any."""

    by_method: Mapping[str, Endpoint]  # shared between matches: never mutated
    token: str | None = None

    @property
    def allow(self) -> str:
        """The ``Allow`` header value for a 405 (§4.3)."""
        return ", ".join(sorted(self.by_method))


# The fixed paths' routes, built once (match_path runs on every request).
_FIXED_ROUTES: dict[str, Route] = {
    VERSION_PATH: Route({"POST": Endpoint.POST_VERSION, "GET": Endpoint.QUERY_VERSION}),
    CHECK_PATH: Route({"GET": Endpoint.CHECK_TASK}),
    TASKING_PATH: Route({"GET": Endpoint.TASKING}),
    REPORT_PATH: Route({"POST": Endpoint.REPORT_RESULT}),
    DEV_INFO_PATH: Route({"GET": Endpoint.DEV_INFO, "POST": Endpoint.DEV_INFO}),
}
_CHECK_TOKEN_METHODS = {"GET": Endpoint.CHECK_TOKEN}
_DOWNLOAD_METHODS = {"GET": Endpoint.DOWNLOAD}
_PROGRESS_METHODS = {"POST": Endpoint.REPORT_PROGRESS}


def match_path(path: str) -> Route | None:
    """Match a request path (query removed) to its endpoints; None for an unknown path (404).

    A single trailing ``/`` is accepted (D20). The token segment is returned as sent; whether it
    is a token this server issued is the endpoint's business.
    """
    if path.endswith("/") and len(path) > 1:
        path = path[:-1]
    fixed = _FIXED_ROUTES.get(path)
    if fixed is not None:
        return fixed
    if path.startswith(DOWNLOAD_PREFIX):
        rest = path[len(DOWNLOAD_PREFIX) :]
        if rest.endswith("/check"):
            token = rest[: -len("/check")]
            if token and "/" not in token:
                return Route(_CHECK_TOKEN_METHODS, token)
            return None
        if rest and "/" not in rest:
            return Route(_DOWNLOAD_METHODS, rest)
        return None
    if path.startswith(PROGRESS_PREFIX) and path.endswith("/progress"):
        token = path[len(PROGRESS_PREFIX) : -len("/progress")]
        if token and "/" not in token:
            return Route(_PROGRESS_METHODS, token)
    return None
