"""The three device dialects as data: endpoint tables, path grammars, and what each dialect
uses of the envelopes, token policies, codes and download framing (spec §4.1, §12, §13).

Rules:

1. One table per dialect lists every endpoint once: its spec label, the operation it performs
   (shared by all dialects, S10, F14), its methods, its path template, whether it needs
   Authorization and which query parameters it reads. Building a path and matching one are both
   derived from that table, never written twice.
2. Path parameters have grammars (§1, §4.5, §12.2): ``{pid}`` 1-32 ``[A-Za-z0-9]``; ``{name}``
   1-64 ``[A-Za-z0-9_.-]``; ``{tid}`` decimal 1..2^31-1 written without sign or leading zero;
   classic ``{token}`` any non-empty segment (whether it was issued is the endpoint's business,
   §6.5; built percent-encoded). A segment outside its grammar matches nothing: the path is
   unknown (404, §4.3), as it would be for any path no endpoint has.
3. Paths are matched as sent (not percent-decoded): the Studio and fuse grammars contain no
   character that needs encoding, so an escape there is a path no client writes.
4. One trailing ``/`` is accepted on every path (D20 for classic; the C SDK's Studio download
   is ``.../download/``, §12.2; F1 for fuse); Studio's other paths share the classic listener and
   take it too.
5. Classic's fixed paths win over Studio's templates (S1), and Studio's ``{pid}`` never takes the
   reserved values ``south``, ``device`` and ``devInfo``: a path under the classic prefixes that
   classic does not know stays unknown, whatever Studio's templates would read into it.
6. Fuse lives under its own prefix ``/fuse-ota/`` (F1) and never overlaps the others.

Theory of operation. :func:`match` takes a request path and the dialects a listener serves and
returns a :class:`Route` (the endpoints by method, for 405's ``Allow``, and the typed path
parameters) or None for a 404. A client builds its request paths with :meth:`EndpointSpec.path`.
:data:`DIALECTS` bundles each dialect's table with its envelope (:mod:`.envelopes`), token
policy (:mod:`onenet_ota.auth`), reply codes (:mod:`.codes`) and download framing
(:mod:`.framing`), so that a server or client written once can be handed any of the three.

The classic server's hot path still uses :func:`onenet_ota.protocol.endpoints.match_path`; a
test checks that it and the classic table here agree on every path.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final
from urllib.parse import quote

from onenet_ota import auth
from onenet_ota.protocol.codes import Dialect, Operation
from onenet_ota.protocol.envelopes import CLASSIC_ENVELOPE, FUSE_ENVELOPE, EnvelopeCodec
from onenet_ota.protocol.framing import (
    CLASSIC_FRAMING,
    FUSE_FRAMING,
    STUDIO_FRAMING,
    DownloadFraming,
)

__all__ = [
    "ALL_DIALECTS",
    "DIALECTS",
    "ENDPOINTS",
    "NAME",
    "PID",
    "STUDIO_PID",
    "TID",
    "TID_MAX",
    "TOKEN",
    "Dialect",
    "DialectSpec",
    "EndpointSpec",
    "Operation",
    "Param",
    "Route",
    "endpoint",
    "match",
]

TID_MAX: Final = 2**31 - 1  # §12.2


@dataclass(frozen=True, slots=True)
class Param:
    """A path parameter: its name in templates and the grammar of its segment."""

    name: str
    pattern: str  # a regular expression for one raw path segment
    maximum: int | None = None  # decimal parameters: the largest value
    reserved: frozenset[str] = frozenset()  # values the grammar admits but the dialect refuses
    percent_encode: bool = False  # built with quote(value, safe=""), matched as sent
    _compiled: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_compiled", re.compile(self.pattern))

    def accepts(self, segment: str) -> bool:
        """Whether a raw path segment is a valid value."""
        if self._compiled.fullmatch(segment) is None or segment in self.reserved:
            return False
        return self.maximum is None or int(segment) <= self.maximum

    def segment(self, value: str | int) -> str:
        """The path segment for ``value``; raises ``ValueError`` when it is outside the grammar."""
        if self.maximum is not None:
            if type(value) is not int:
                raise ValueError(f"{{{self.name}}} is a decimal integer, not {value!r}")
            text = str(value)
        elif isinstance(value, str):
            text = quote(value, safe="") if self.percent_encode else value
        else:
            raise ValueError(f"{{{self.name}}} is a string, not {value!r}")
        if not self.accepts(text):
            # A download token is the download's credential (D5): never echo it.
            shown = "this value" if self.percent_encode else repr(value)
            raise ValueError(f"{shown} is not a valid {{{self.name}}}")
        return text


PID: Final = Param("pid", r"[A-Za-z0-9]{1,32}")  # §1
NAME: Final = Param("name", r"[A-Za-z0-9_.\-]{1,64}")  # §1
# S1: management refuses these pids, because the classic paths start with them.
STUDIO_PID: Final = Param("pid", PID.pattern, reserved=frozenset({"south", "device", "devInfo"}))
# §12.2: 1 <= tid <= 2^31-1. Canonical decimal only (docs/dialects.md): the C SDK prints "%d".
TID: Final = Param("tid", r"[1-9][0-9]{0,9}", maximum=TID_MAX)
# §6.5, D13: any segment; an unknown token is errno 4 / byte 3, not a 404.
TOKEN: Final = Param("token", r"[^/]+", percent_encode=True)

_PARAMS_BY_DIALECT: Final = {
    Dialect.CLASSIC: {"token": TOKEN},
    Dialect.STUDIO: {"pid": STUDIO_PID, "name": NAME, "tid": TID},
    Dialect.FUSE: {"pid": PID, "name": NAME, "tid": TID},
}
_PLACEHOLDER_RE: Final = re.compile(r"\{([a-z]+)\}")


@dataclass(frozen=True, slots=True)
class EndpointSpec:
    """One endpoint of one dialect (a row of §4.1, §12.2 or §13.1)."""

    label: str  # the spec's name: "E3", "S-C", "F-C"
    dialect: Dialect
    operation: Operation
    methods: tuple[str, ...]
    template: str  # "/ota/{pid}/{name}/{tid}/check"
    authorization: bool  # D5: classic E6 needs none; S2, F2: every Studio and fuse endpoint
    query: tuple[str, ...] = ()  # the query parameters it reads
    segments: tuple[str | Param, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.template.startswith("/") or self.template.endswith("/"):
            raise ValueError(f"template {self.template!r} must start and not end with '/'")
        params = _PARAMS_BY_DIALECT[self.dialect]
        parts: list[str | Param] = []
        for piece in self.template[1:].split("/"):
            placeholder = _PLACEHOLDER_RE.fullmatch(piece)
            parts.append(params[placeholder.group(1)] if placeholder else piece)
        object.__setattr__(self, "segments", tuple(parts))

    @property
    def param_names(self) -> tuple[str, ...]:
        """The path parameters, in path order."""
        return tuple(p.name for p in self.segments if isinstance(p, Param))

    def path(self, **values: str | int) -> str:
        """The request path (without query) for these parameter values.

        Raises ``ValueError`` for a missing, unexpected or invalid value.
        """
        unexpected = set(values) - set(self.param_names)
        if unexpected:
            raise ValueError(f"{self.label} has no parameter {', '.join(sorted(unexpected))}")
        out = []
        for part in self.segments:
            if isinstance(part, str):
                out.append(part)
                continue
            if part.name not in values:
                raise ValueError(f"{self.label} needs {{{part.name}}}")
            out.append(part.segment(values[part.name]))
        return "/" + "/".join(out)

    def match_segments(self, segments: list[str]) -> dict[str, str | int] | None:
        """The parameter values if the split path fits this template, else None."""
        if len(segments) != len(self.segments):
            return None
        found: dict[str, str | int] = {}
        for part, segment in zip(self.segments, segments, strict=True):
            if isinstance(part, str):
                if part != segment:
                    return None
            elif not part.accepts(segment):
                return None
            else:
                found[part.name] = int(segment) if part.maximum is not None else segment
        return found


C, ST, FU = Dialect.CLASSIC, Dialect.STUDIO, Dialect.FUSE
Op = Operation
_CHECK_QUERY: Final = ("type", "version")

ENDPOINTS: Final[tuple[EndpointSpec, ...]] = (
    # §4.1: the classic API. P2's dev_id is on every JSON endpoint but E9 (§4.2).
    EndpointSpec("E1", C, Op.REPORT_VERSION, ("POST",), "/ota/device/version", True, ("dev_id",)),
    EndpointSpec("E2", C, Op.QUERY_VERSION, ("GET",), "/ota/device/version", True, ("dev_id",)),
    EndpointSpec(
        "E3",
        C,
        Op.CHECK_TASK,
        ("GET",),
        "/ota/south/check",
        True,
        ("dev_id", "type", "version", "cdn", "manuf", "model"),
    ),
    EndpointSpec(
        "E4", C, Op.TASKING, ("GET",), "/ota/south/tasking", True, ("dev_id", "type", "cdn")
    ),
    EndpointSpec(
        "E5", C, Op.CHECK_STATE, ("GET",), "/ota/south/download/{token}/check", True, ("dev_id",)
    ),
    # D5: the path token is the credential.
    EndpointSpec("E6", C, Op.DOWNLOAD, ("GET",), "/ota/south/download/{token}", False, ("s_id",)),
    EndpointSpec(
        "E7",
        C,
        Op.REPORT_STATUS,
        ("POST",),
        "/ota/south/device/download/{token}/progress",
        True,
        ("dev_id",),
    ),
    EndpointSpec(
        "E8", C, Op.REPORT_RESULT, ("POST",), "/ota/south/report", True, ("dev_id", "token")
    ),
    # D18: OneNET documents GET with a JSON body; third-party clients POST.
    EndpointSpec("E9", C, Op.DEV_INFO, ("GET", "POST"), "/ota/devInfo", True),
    # §12.2: Studio. The device is in the path; tid replaces the token; S2: auth everywhere.
    EndpointSpec("S-V", ST, Op.REPORT_VERSION, ("POST",), "/ota/{pid}/{name}/version", True),
    EndpointSpec("S-Q", ST, Op.QUERY_VERSION, ("GET",), "/ota/{pid}/{name}/version", True),
    EndpointSpec("S-C", ST, Op.CHECK_TASK, ("GET",), "/ota/{pid}/{name}/check", True, _CHECK_QUERY),
    EndpointSpec("S-T", ST, Op.CHECK_STATE, ("GET",), "/ota/{pid}/{name}/{tid}/check", True),
    EndpointSpec("S-D", ST, Op.DOWNLOAD, ("GET",), "/ota/{pid}/{name}/{tid}/download", True),
    EndpointSpec("S-R", ST, Op.REPORT_STATUS, ("POST",), "/ota/{pid}/{name}/{tid}/status", True),
    # §13.1: fuse, under its own prefix (F1); F2: auth everywhere.
    EndpointSpec("F-V", FU, Op.REPORT_VERSION, ("POST",), "/fuse-ota/{pid}/{name}/version", True),
    EndpointSpec("F-Q", FU, Op.QUERY_VERSION, ("GET",), "/fuse-ota/{pid}/{name}/version", True),
    EndpointSpec(
        "F-C", FU, Op.CHECK_TASK, ("GET",), "/fuse-ota/{pid}/{name}/check", True, _CHECK_QUERY
    ),
    EndpointSpec("F-T", FU, Op.CHECK_STATE, ("GET",), "/fuse-ota/{pid}/{name}/{tid}/check", True),
    EndpointSpec("F-D", FU, Op.DOWNLOAD, ("GET",), "/fuse-ota/{pid}/{name}/{tid}/download", True),
    EndpointSpec(
        "F-R", FU, Op.REPORT_STATUS, ("POST",), "/fuse-ota/{pid}/{name}/{tid}/status", True
    ),
)
"""Every endpoint of every dialect. Order matters only between dialects: classic first (S1)."""

_BY_KEY: Final = {(spec.dialect, spec.operation): spec for spec in ENDPOINTS}


def endpoint(dialect: Dialect, operation: Operation) -> EndpointSpec:
    """The endpoint performing ``operation`` in ``dialect``; ``KeyError`` if it has none."""
    try:
        return _BY_KEY[(dialect, operation)]
    except KeyError:
        raise KeyError(f"{dialect.value} has no {operation.name.lower()} endpoint") from None


@dataclass(frozen=True, slots=True)
class Route:
    """A matched path: its dialect, the endpoints living there by method, and the typed values
    of its path parameters."""

    dialect: Dialect
    template: str
    by_method: Mapping[str, EndpointSpec]
    pid: str | None = None
    name: str | None = None
    tid: int | None = None
    token: str | None = None

    @property
    def allow(self) -> str:
        """The ``Allow`` header value for a 405 (§4.3)."""
        return ", ".join(sorted(self.by_method))


@dataclass(frozen=True, slots=True)
class _Template:
    dialect: Dialect
    template: str
    sample: EndpointSpec  # any endpoint with this template: they share the segments
    by_method: Mapping[str, EndpointSpec]


def _templates() -> tuple[_Template, ...]:
    grouped: dict[tuple[Dialect, str], dict[str, EndpointSpec]] = {}
    samples: dict[tuple[Dialect, str], EndpointSpec] = {}
    for spec in ENDPOINTS:
        key = (spec.dialect, spec.template)
        samples.setdefault(key, spec)
        methods = grouped.setdefault(key, {})
        for method in spec.methods:
            if method in methods:
                raise ValueError(f"{spec.label} and {methods[method].label} share {method}")
            methods[method] = spec
    return tuple(
        _Template(d, t, samples[(d, t)], MappingProxyType(methods))
        for (d, t), methods in grouped.items()
    )


_TEMPLATES: Final = _templates()
ALL_DIALECTS: Final = frozenset(Dialect)


def match(path: str, dialects: Iterable[Dialect] = ALL_DIALECTS) -> Route | None:
    """Match a request path (query removed) against the tables of ``dialects``; None is 404.

    Classic wins where its paths and Studio's templates overlap (S1); see the module's rules.
    """
    wanted = frozenset(dialects)
    if path.endswith("/") and len(path) > 1:  # D20, §12.2, F1: one trailing slash
        path = path[:-1]
    if not path.startswith("/"):
        return None
    segments = path[1:].split("/")
    for entry in _TEMPLATES:
        if entry.dialect not in wanted:
            continue
        found = entry.sample.match_segments(segments)
        if found is None:
            continue
        return Route(
            dialect=entry.dialect,
            template=entry.template,
            by_method=entry.by_method,
            pid=_str(found.get("pid")),
            name=_str(found.get("name")),
            tid=_int(found.get("tid")),
            token=_str(found.get("token")),
        )
    return None


def _str(value: str | int | None) -> str | None:
    return value if isinstance(value, str) else None


def _int(value: str | int | None) -> int | None:
    return value if isinstance(value, int) else None


@dataclass(frozen=True, slots=True)
class DialectSpec:
    """Everything that tells one dialect from another, as values."""

    dialect: Dialect
    endpoints: tuple[EndpointSpec, ...]
    envelope: EnvelopeCodec  # §4.3 / §13.2
    token_policy: auth.TokenPolicy  # D3 / S2 / F2
    framing: DownloadFraming  # §6.6 / §12.3 / §13.4
    task_ref: str  # how a request names its task after the check: "token" or "tid"


DIALECTS: Final[Mapping[Dialect, DialectSpec]] = MappingProxyType(
    {
        C: DialectSpec(
            C,
            tuple(e for e in ENDPOINTS if e.dialect is C),
            CLASSIC_ENVELOPE,
            auth.CLASSIC_POLICY,
            CLASSIC_FRAMING,
            "token",
        ),
        ST: DialectSpec(
            ST,
            tuple(e for e in ENDPOINTS if e.dialect is ST),
            CLASSIC_ENVELOPE,  # §12.1: the classic envelope; the C SDK reads only errno
            auth.STUDIO_POLICY,
            STUDIO_FRAMING,
            "tid",
        ),
        FU: DialectSpec(
            FU,
            tuple(e for e in ENDPOINTS if e.dialect is FU),
            FUSE_ENVELOPE,
            auth.FUSE_POLICY,
            FUSE_FRAMING,
            "tid",
        ),
    }
)
