"""The endpoint tables of the three dialects (spec §4.1, §12.2, §13.1, S1, F1, D20): golden paths,
refusals, property tests over the grammars, and the things-model captures of the C SDK."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from onenet_ota import auth
from onenet_ota.protocol.dialects import (
    DIALECTS,
    ENDPOINTS,
    TID_MAX,
    Dialect,
    EndpointSpec,
    Operation,
    endpoint,
    match,
)
from onenet_ota.protocol.endpoints import match_path
from onenet_ota.protocol.ranges import parse_range

CAPTURES = Path(__file__).resolve().parent.parent / "data" / "c-sdk-captures-things-model"
CLASSIC_CAPTURES = Path(__file__).resolve().parent.parent / "data" / "c-sdk-captures"
K1 = "MHEoPy2atlp4V/zqE09jYh/16aWJQkQjtgLsFaCnfvg="
TOKEN = "ota_3fQ9cZr0LmT7wXa2bN5k"
C, ST, FU = Dialect.CLASSIC, Dialect.STUDIO, Dialect.FUSE
SPECS = {spec.label: spec for spec in ENDPOINTS}
DEV: dict[str, str | int] = {"pid": "123123", "name": "dev01"}
TASK: dict[str, str | int] = {**DEV, "tid": 4242}

# label -> (parameters, the path written out by hand from the spec's tables).
GOLDEN: dict[str, tuple[dict[str, str | int], str]] = {
    "E1": ({}, "/ota/device/version"),
    "E2": ({}, "/ota/device/version"),
    "E3": ({}, "/ota/south/check"),
    "E4": ({}, "/ota/south/tasking"),
    "E5": ({"token": TOKEN}, f"/ota/south/download/{TOKEN}/check"),
    "E6": ({"token": TOKEN}, f"/ota/south/download/{TOKEN}"),
    "E7": ({"token": TOKEN}, f"/ota/south/device/download/{TOKEN}/progress"),
    "E8": ({}, "/ota/south/report"),
    "E9": ({}, "/ota/devInfo"),
    "S-V": (DEV, "/ota/123123/dev01/version"),
    "S-Q": (DEV, "/ota/123123/dev01/version"),
    "S-C": (DEV, "/ota/123123/dev01/check"),
    "S-T": (TASK, "/ota/123123/dev01/4242/check"),
    "S-D": (TASK, "/ota/123123/dev01/4242/download"),
    "S-R": (TASK, "/ota/123123/dev01/4242/status"),
    "F-V": (DEV, "/fuse-ota/123123/dev01/version"),
    "F-Q": (DEV, "/fuse-ota/123123/dev01/version"),
    "F-C": (DEV, "/fuse-ota/123123/dev01/check"),
    "F-T": (TASK, "/fuse-ota/123123/dev01/4242/check"),
    "F-D": (TASK, "/fuse-ota/123123/dev01/4242/download"),
    "F-R": (TASK, "/fuse-ota/123123/dev01/4242/status"),
}
METHODS = {
    "E1": ("POST",),
    "E2": ("GET",),
    "E3": ("GET",),
    "E4": ("GET",),
    "E5": ("GET",),
    "E6": ("GET",),
    "E7": ("POST",),
    "E8": ("POST",),
    "E9": ("GET", "POST"),
    "S-V": ("POST",),
    "S-Q": ("GET",),
    "S-C": ("GET",),
    "S-T": ("GET",),
    "S-D": ("GET",),
    "S-R": ("POST",),
    "F-V": ("POST",),
    "F-Q": ("GET",),
    "F-C": ("GET",),
    "F-T": ("GET",),
    "F-D": ("GET",),
    "F-R": ("POST",),
}


def test_the_golden_table_covers_every_endpoint() -> None:
    assert set(GOLDEN) == set(SPECS)
    assert len(SPECS) == len(ENDPOINTS)  # labels are unique


@pytest.mark.parametrize("label", list(GOLDEN))
def test_build_and_match_every_path(label: str) -> None:
    spec = SPECS[label]
    params, path = GOLDEN[label]
    assert spec.path(**params) == path
    assert spec.methods == METHODS[label]
    for candidate in (path, path + "/"):  # D20, §12.2 (".../download/"), F1
        route = match(candidate)
        assert route is not None, candidate
        assert route.dialect is spec.dialect
        for method in spec.methods:
            assert route.by_method[method] is spec
        assert route.pid == params.get("pid")
        assert route.name == params.get("name")
        assert route.tid == params.get("tid")
        assert route.token == params.get("token")


@pytest.mark.parametrize(
    ("path", "allow"),
    [
        ("/ota/device/version", "GET, POST"),
        ("/ota/devInfo", "GET, POST"),
        ("/ota/1/d/version", "GET, POST"),
        ("/fuse-ota/1/d/version", "GET, POST"),
        ("/ota/1/d/check", "GET"),
        ("/ota/1/d/7/status", "POST"),
        ("/fuse-ota/1/d/7/download", "GET"),
    ],
)
def test_allow_values(path: str, allow: str) -> None:
    route = match(path)
    assert route is not None
    assert route.allow == allow


@pytest.mark.parametrize(
    "path",
    [
        # tids out of range or not canonical decimal (§12.2)
        "/ota/123123/dev01/0/check",
        f"/ota/123123/dev01/{TID_MAX + 1}/check",
        "/ota/123123/dev01/9999999999/download",
        "/ota/123123/dev01/12345678901/status",
        "/ota/123123/dev01/-1/check",
        "/ota/123123/dev01/+5/check",
        "/ota/123123/dev01/0042/check",
        "/ota/123123/dev01/42a/check",
        "/ota/123123/dev01/4%32/check",
        "/ota/123123/dev01/%34%32/check",
        "/ota/123123/dev01/４２/check",  # full-width digits are not decimal here
        "/ota/123123/dev01/42.0/status",
        "/ota/123123/dev01/ 42/check",
        "/fuse-ota/123123/dev01/0/download",
        f"/fuse-ota/123123/dev01/{2**31}/status",
        "/fuse-ota/123123/dev01/x/check",
        # pid and name outside §1
        "/ota/12_3/dev01/version",
        f"/ota/{'1' * 33}/dev01/version",
        f"/ota/123123/{'d' * 65}/version",
        "/ota/123123/dev%2001/version",
        "/ota/123123/dev 01/version",
        "/fuse-ota/12-3/dev01/check",
        "/fuse-ota/123123/dev/01/check",
        # S1: reserved pids never reach Studio's table
        "/ota/south/dev01/version",
        "/ota/device/dev01/check",
        "/ota/devInfo/dev01/4242/check",
        "/ota/south/check/x",
        # shapes no endpoint has
        "/",
        "",
        "ota/123123/dev01/version",
        "/ota",
        "/ota/123123",
        "/ota/123123/dev01",
        "/ota/123123/dev01/",
        "/ota/123123/dev01/version//",
        "/ota//dev01/version",
        "/ota/123123//version",
        "/ota/123123/dev01/4242",
        "/ota/123123/dev01/4242/check/x",
        "/ota/123123/dev01/4242/Download",
        "/ota/123123/dev01/VERSION",
        "/OTA/123123/dev01/version",
        "/fuse-ota/123123/dev01",
        "/fuse-ota/123123/dev01/4242/progress",
        "/fuse-ota/south/check",
        "/fuse/123123/dev01/version",
        "/ota/south/download/",
        "/ota/south/download//check",
        "/ota/south/device/download//progress",
    ],
)
def test_malformed_paths_match_nothing(path: str) -> None:
    assert match(path) is None


@pytest.mark.parametrize(
    ("path", "label", "token"),
    [
        # S1: where a classic path and a Studio template overlap, classic wins.
        ("/ota/south/download/4242/check", "E5", "4242"),
        ("/ota/south/download/check", "E6", "check"),
        ("/ota/south/download/download", "E6", "download"),
    ],
)
def test_classic_wins_over_studio(path: str, label: str, token: str) -> None:
    route = match(path)
    assert route is not None
    assert route.dialect is C
    assert route.by_method["GET"].label == label
    assert route.token == token
    # A listener that serves Studio alone reads those paths with the reserved pid: nothing.
    assert match(path, {ST}) is None


def test_a_listener_matches_only_its_dialects() -> None:
    assert match("/ota/123123/dev01/version", {C}) is None
    assert match("/fuse-ota/123123/dev01/version", {C, ST}) is None
    assert match("/ota/device/version", {ST, FU}) is None
    route = match("/ota/123123/dev01/version", {ST})
    assert route is not None
    assert route.dialect is ST


@pytest.mark.parametrize(
    ("label", "params", "message"),
    [
        ("S-T", {**DEV, "tid": 0}, "tid"),
        ("S-T", {**DEV, "tid": TID_MAX + 1}, "tid"),
        ("S-T", {**DEV, "tid": -5}, "tid"),
        ("S-T", {**DEV, "tid": "4242"}, "decimal integer"),
        ("S-T", {**DEV, "tid": True}, "decimal integer"),
        ("S-T", DEV, "needs"),
        ("S-V", {**DEV, "tid": 1}, "no parameter"),
        ("S-V", {"pid": "south", "name": "dev01"}, "pid"),  # S1
        ("S-V", {"pid": "a/b", "name": "dev01"}, "pid"),
        ("F-V", {"pid": "", "name": "dev01"}, "pid"),
        ("F-V", {"pid": "1", "name": "d" * 65}, "name"),
        ("F-V", {"pid": "1", "name": 5}, "string"),
        ("E5", {"token": ""}, "token"),
        ("E5", {}, "needs"),
        ("E1", {"token": TOKEN}, "no parameter"),
    ],
)
def test_building_refuses_values_outside_the_grammars(
    label: str, params: dict[str, str | int], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        SPECS[label].path(**params)


def test_classic_tokens_are_percent_encoded_and_matched_as_sent() -> None:
    path = SPECS["E6"].path(token="a/b c")
    assert path == "/ota/south/download/a%2Fb%20c"
    route = match(path)
    assert route is not None
    assert route.token == "a%2Fb%20c"


def test_endpoint_lookup() -> None:
    assert endpoint(ST, Operation.CHECK_TASK) is SPECS["S-C"]
    assert endpoint(C, Operation.DEV_INFO) is SPECS["E9"]
    for op in (Operation.TASKING, Operation.REPORT_RESULT, Operation.DEV_INFO):
        with pytest.raises(KeyError, match="no"):
            endpoint(FU, op)


def test_dialect_bundles() -> None:
    for dialect, spec in DIALECTS.items():
        assert spec.dialect is dialect
        assert {e.label for e in spec.endpoints} == {
            label for label, s in SPECS.items() if s.dialect is dialect
        }
    # D5: only the classic download goes without credential; S2, F2: Studio and fuse need one.
    assert [e.label for e in ENDPOINTS if not e.authorization] == ["E6"]
    assert DIALECTS[C].token_policy is auth.CLASSIC_POLICY
    assert DIALECTS[ST].token_policy is auth.STUDIO_POLICY
    assert DIALECTS[FU].token_policy is auth.FUSE_POLICY
    assert DIALECTS[ST].envelope is DIALECTS[C].envelope  # §12.1
    assert DIALECTS[FU].envelope.code_key == "code"  # §13.2
    assert [DIALECTS[d].task_ref for d in Dialect] == ["token", "tid", "tid"]


def test_a_template_must_be_a_path() -> None:
    with pytest.raises(ValueError, match="template"):
        EndpointSpec("X", C, Operation.DOWNLOAD, ("GET",), "/ota/x/", True)


# -- property tests over the grammars -------------------------------------------------------------
pids = st.from_regex(r"[A-Za-z0-9]{1,32}", fullmatch=True).filter(
    lambda p: p not in {"south", "device", "devInfo"}
)
names = st.from_regex(r"[A-Za-z0-9_.\-]{1,64}", fullmatch=True)
tids = st.integers(1, TID_MAX)
tid_specs = [s for s in ENDPOINTS if "tid" in s.param_names]
device_specs = [s for s in ENDPOINTS if s.param_names == ("pid", "name")]


@given(st.sampled_from(tid_specs), pids, names, tids, st.booleans())
def test_every_valid_tid_path_round_trips(
    spec: EndpointSpec, pid: str, name: str, tid: int, slash: bool
) -> None:
    path = spec.path(pid=pid, name=name, tid=tid) + ("/" if slash else "")
    route = match(path)
    assert route is not None
    assert route.by_method[spec.methods[0]] is spec
    assert (route.pid, route.name, route.tid) == (pid, name, tid)


@given(st.sampled_from(device_specs), pids, names)
def test_every_valid_device_path_round_trips(spec: EndpointSpec, pid: str, name: str) -> None:
    route = match(spec.path(pid=pid, name=name))
    assert route is not None
    assert route.by_method[spec.methods[0]] is spec
    assert (route.pid, route.name, route.tid) == (pid, name, None)


@given(
    st.sampled_from(tid_specs),
    st.one_of(st.integers(max_value=0), st.integers(min_value=TID_MAX + 1)),
)
def test_tids_out_of_range_are_refused_both_ways(spec: EndpointSpec, tid: int) -> None:
    with pytest.raises(ValueError, match="tid"):
        spec.path(pid="123123", name="dev01", tid=tid)
    written = spec.template.format(pid="123123", name="dev01", tid=tid)
    assert match(written) is None


@given(st.sampled_from(tid_specs), st.text(min_size=1, max_size=12))
def test_a_tid_segment_matches_only_canonical_decimals_in_range(
    spec: EndpointSpec, segment: str
) -> None:
    written = spec.template.format(pid="123123", name="dev01", tid=segment)
    route = match(written)
    canonical = segment.isascii() and segment.isdigit() and segment[0] != "0"
    if canonical and int(segment) <= TID_MAX:
        assert route is not None
        assert route.tid == int(segment)
    elif "/" not in segment:
        assert route is None


segments = st.text(alphabet=st.sampled_from("ota/southdevicnkrpgsIf-_.01%2F"), max_size=40)


@given(st.one_of(segments, st.sampled_from([p for _, p in GOLDEN.values()])))
def test_classic_table_agrees_with_the_classic_matcher(path: str) -> None:
    # endpoints.match_path is the classic server's matcher; the table must say the same.
    legacy = match_path(path) if path.startswith("/") else None
    route = match(path, {C})
    if legacy is None:
        assert route is None
        return
    assert route is not None
    assert route.token == legacy.token
    assert {m: e.label for m, e in route.by_method.items()} == {
        m: e.value for m, e in legacy.by_method.items()
    }


# -- the C SDK in things-model mode (spec Appendix C) ------------------------------------------
STEP_LABELS = {
    "post_version": "S-V",
    "check_task": "S-C",
    "check_token": "S-T",
    "download": "S-D",
    "report_status": "S-R",
}
CONNECTIONS = [
    json.loads(line) for line in (CAPTURES / "connections.jsonl").read_text().splitlines() if line
]


def _split(raw: bytes) -> tuple[str, str, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("ascii").split("\r\n")
    method, target, version = lines[0].split(" ")
    assert version == "HTTP/1.1"
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")  # §8.1: no space after the colon
        headers[name.lower()] = value.strip()
    return method, target, headers, body


def test_the_vendored_captures_are_complete() -> None:
    assert len(CONNECTIONS) == 10
    assert (CAPTURES / "firmware.bin").stat().st_size == 10000


@pytest.mark.parametrize("conn", CONNECTIONS, ids=[c["file"] for c in CONNECTIONS])
def test_things_model_captures_match_the_studio_table(conn: dict[str, object]) -> None:
    raw = (CAPTURES / f"{conn['file']}.request.bin").read_bytes()
    assert len(raw) == conn["request_len"]
    method, target, headers, body = _split(raw)
    assert f"{method} {target} HTTP/1.1" == conn["request_line"]
    url = urlsplit(target)
    route = match(url.path, {C, ST})  # one listener serves both (§12, S1)
    assert route is not None
    spec = route.by_method[method]
    assert spec.label == STEP_LABELS[str(conn["step"])]
    assert spec.dialect is ST
    assert (route.pid, route.name) == ("123123", "dev01")
    assert route.tid == (4242 if "tid" in spec.param_names else None)
    assert match(url.path, {C}) is None  # classic alone does not know these paths
    query = dict(parse_qsl(url.query))
    assert set(query) == set(spec.query)
    if spec.label == "S-C":
        assert query == {"type": "1", "version": "1.0.0"}
    # S2: a device-level token for the path's device, verifiable with K1 (§3.4: no device key).
    token = auth.parse_any_token(headers["authorization"], policy=DIALECTS[ST].token_policy)
    assert auth.key_source(token) is auth.KeySource.DEVICE_OR_PRODUCT
    auth.verify_token(token, auth.decode_key(K1), now=1_700_000_000)
    assert route.pid is not None
    assert route.name is not None
    assert auth.grants(token, pid=route.pid, device_name=route.name)
    assert headers["host"] == "studio-ota.heclouds.com"  # ignored by the server (D20)
    if method == "POST":
        assert int(headers["content-length"]) == len(body)
        assert set(json.loads(body)) <= {"f_version", "s_version", "step"}
    else:
        assert body == b""
    if spec.label == "S-D":
        assert "content-type" not in headers
        assert target.endswith("/download/")  # the C SDK's trailing slash (§12.2)
        assert parse_range(headers["range"]) is not None


def test_classic_captures_match_the_classic_table() -> None:
    labels = []
    for path in sorted(CLASSIC_CAPTURES.glob("*.request.bin")):
        method, target, _, _ = _split(path.read_bytes())
        route = match(urlsplit(target).path)
        assert route is not None
        assert route.dialect is C
        labels.append(route.by_method[method].label)
    assert labels == ["E1", "E3", "E5", "E6", "E5", "E6", "E5", "E6", "E7", "E7"]
