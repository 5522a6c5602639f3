"""Authorization over HTTP (spec §3.3, §3.4, §4.2; D3, D4): the Appendix B.1 vectors, their
negative cases, and the bindings between token, product and device.

Product ``123123`` has key K1 and devices ``dev01`` (987654321, the capture device) and ``dev02``;
product ``456456`` (key K2) has ``dev03``. The clock stands at T0, before the C SDK's et.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx2
import pytest
from sqlalchemy import Engine, update

from onenet_ota import auth
from onenet_ota.server.blobs import BlobStore
from onenet_ota.server.schema import devices
from tests.server.seed import (
    DB_PARAMS,
    DEV_ID,
    K1,
    K2,
    SDK_AUTH,
    T0,
    FakeClock,
    Seeder,
    module_database,
    running_api,
)

DEV02 = 987654322
DEV03 = 123456789
OTHER_PID = "456456"

# Appendix B.1: vector number -> header value. Odd numbers are product level, even ones dev01.
_PRODUCT = "products%2F123123"
_DEVICE = "products%2F123123%2Fdevices%2Fdev01"


def _vector(res: str, method: str, sign: str) -> str:
    return f"version=2018-10-31&res={res}&et=2524579200&method={method}&sign={sign}"


VECTORS = {
    1: _vector(_PRODUCT, "md5", "aD7EBzDi3gnhTuI186DKYw%3D%3D"),
    2: _vector(_DEVICE, "md5", "z%2FkpB%2FSLmqQ71CDM50uQXg%3D%3D"),
    3: SDK_AUTH,
    4: _vector(_DEVICE, "sha1", "37MTwnM8%2Fn9AhfAk1EWPEevSNIc%3D"),
    5: _vector(_PRODUCT, "sha256", "nLZr%2B%2FyCWPyEQSlZJ%2Fje4188nsXcGxe059ZepgN25Zk%3D"),
    6: _vector(_DEVICE, "sha256", "ZqklpThdPTsziNTwCdXtU%2FF2O6mtpcYTF3MT8DudRi8%3D"),
    7: _vector(_PRODUCT, "md5", "NrDYedTmz6fydYJkUVeNow%3D%3D"),
    8: _vector(_DEVICE, "md5", "O4MbVybkrZaaV6xdwVjwqw%3D%3D"),
    9: _vector(_PRODUCT, "sha1", "4rDtm2uJARRfB1uyCq4%2BBQxSca0%3D"),
    10: _vector(_DEVICE, "sha1", "K7ik2Mrqey7J7PVgySodOijEKFg%3D"),
    11: _vector(_PRODUCT, "sha256", "vBi19Qi1PKeZ%2BgeOh6pdpjOMB8gMyDAi7RIb8GyffCc%3D"),
    12: _vector(_DEVICE, "sha256", "S7wQDI5HloHl791MHm%2FHItCI5yK1aAD5ZYU6jiEDJwQ%3D"),
}
RAW_3 = _vector("products/123123", "sha1", "4+7IKBIL5vNCYd9mzZZg40vs9vc=")


@pytest.fixture(scope="module", params=DB_PARAMS)
def env(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Engine, httpx2.Client]]:
    with module_database(request, tmp_path_factory) as engine:
        clock = FakeClock()
        seeder = Seeder(engine, BlobStore(tmp_path_factory.mktemp("blobs")), clock)
        seeder.capture_world()
        seeder.device(DEV02, name="dev02")
        seeder.product(OTHER_PID, K2)
        seeder.device(DEV03, OTHER_PID, "dev03")
        with (
            running_api(engine, seeder.blobs, clock) as (_, srv),
            httpx2.Client(base_url=srv.url) as client,
        ):
            yield engine, client


@pytest.fixture
def client(env: tuple[Engine, httpx2.Client]) -> Iterator[httpx2.Client]:
    engine, client = env
    yield client
    with engine.begin() as conn:  # undo test_device_key_*
        conn.execute(update(devices).values(device_key=None))


def errno(client: httpx2.Client, authorization: str | None, dev_id: int = DEV_ID) -> int:
    """E2 (no side effects) with this Authorization value."""
    headers = {} if authorization is None else {"Authorization": authorization}
    response = client.get("/ota/device/version", params={"dev_id": dev_id}, headers=headers)
    assert response.status_code == 200  # auth failures are business errors (D1)
    return int(response.json()["errno"])


@pytest.mark.parametrize("vector", [1, 2, 3, 4, 5, 6])
def test_k1_vectors_verify(client: httpx2.Client, vector: int) -> None:
    assert errno(client, VECTORS[vector]) == 0


@pytest.mark.parametrize("vector", [7, 8, 9, 10, 11, 12])
def test_another_products_key_is_rejected(client: httpx2.Client, vector: int) -> None:
    assert errno(client, VECTORS[vector]) == 1  # signed with K2, product 123123 has K1


def test_raw_form_verifies_like_the_encoded_one(client: httpx2.Client) -> None:
    assert errno(client, RAW_3) == 0
    mixed = _vector("products%2f123123", "sha1", "4%2b7IKBIL5vNCYd9mzZZg40vs9vc%3d")
    assert errno(client, mixed) == 0  # lower-case hex escapes (§3.3 step 3)


def test_field_order_and_unknown_fields_do_not_matter(client: httpx2.Client) -> None:
    fields = dict(piece.split("=", 1) for piece in SDK_AUTH.split("&"))
    reordered = "&".join(f"{k}={fields[k]}" for k in ("sign", "method", "et", "res", "version"))
    assert errno(client, reordered) == 0
    assert errno(client, SDK_AUTH + "&extra=1&&") == 0


@pytest.mark.parametrize(
    "value",
    [
        SDK_AUTH.replace("et=2524579200", "et=2524579201"),  # et changed
        SDK_AUTH.replace("method=sha1", "method=sha256"),
        RAW_3.replace("+", " "),  # + decoded as a space
        RAW_3.replace("+", "%20"),
        SDK_AUTH.replace("2018-10-31", "2022-05-01"),
        SDK_AUTH.replace("method=sha1", "method=SHA1"),
        SDK_AUTH.replace("sign=4", "sign=5"),  # bad sign
        SDK_AUTH[: -len("%3D")],  # sign without padding
        SDK_AUTH + "&sign=x",  # a field twice
        SDK_AUTH.replace("&method=sha1", ""),  # a field missing
        SDK_AUTH.replace("&method=sha1", "&method"),  # a piece without '='
        SDK_AUTH.replace("%2F", "%2G"),  # bad escape
        SDK_AUTH.replace("%2F", "%"),
        SDK_AUTH.replace("products%2F123123", "products%2F123123%2F"),  # empty segment
        SDK_AUTH.replace("products%2F123123", "products%2F123123%2Fdevices%2Fdev01%2Fx"),
        SDK_AUTH.replace("products%2F123123", "products%2F999999"),  # unknown product
        SDK_AUTH.replace("products%2F123123", "users%2F123123"),
        SDK_AUTH.replace("Version", "version").replace("version=", "Version="),  # key case
        "Bearer " + SDK_AUTH,
        "",
        "garbage",
        SDK_AUTH.replace("et=2524579200", "et=" + "9" * 21),
        SDK_AUTH.replace("et=2524579200", f"et={2**63}"),
        SDK_AUTH.replace("et=2524579200", "et=-1"),
        SDK_AUTH.replace("et=2524579200", "et=0x96"),
    ],
)
def test_negative_cases_are_errno_1(client: httpx2.Client, value: str) -> None:
    assert errno(client, value) == 1


def test_missing_authorization_is_errno_1(client: httpx2.Client) -> None:
    assert errno(client, None) == 1


@pytest.mark.parametrize("method", ["md5", "sha1", "sha256"])
def test_et_must_not_be_in_the_past(client: httpx2.Client, method: str) -> None:
    assert errno(client, auth.build_token("123123", K1, et=T0, method=method)) == 0  # et == now
    assert errno(client, auth.build_token("123123", K1, et=T0 - 1, method=method)) == 1
    # et is 64-bit: values above 2^32 are fine (OneNET's examples use 7555917657).
    assert errno(client, auth.build_token("123123", K1, et=7555917657, method=method)) == 0
    assert errno(client, auth.build_token("123123", K1, et=2**63 - 1, method=method)) == 0


def test_dev_id_outside_the_product_is_errno_1(client: httpx2.Client) -> None:
    assert errno(client, SDK_AUTH, DEV03) == 1  # dev03 belongs to 456456
    assert errno(client, auth.build_token(OTHER_PID, K2), DEV03) == 0
    assert errno(client, auth.build_token(OTHER_PID, K2), DEV_ID) == 1


def test_device_level_token_speaks_only_for_its_device(client: httpx2.Client) -> None:
    dev01 = VECTORS[4]
    assert errno(client, dev01, DEV_ID) == 0
    assert errno(client, dev01, DEV02) == 1  # dev02 is in the product, but not dev01
    dev02 = auth.build_token("123123", K1, device_name="dev02")
    assert errno(client, dev02, DEV02) == 0
    assert errno(client, dev02, DEV_ID) == 1
    ghost = auth.build_token("123123", K1, device_name="ghost")
    assert errno(client, ghost, DEV_ID) == 1  # no such device in the product
    dev03_in_123123 = auth.build_token("123123", K1, device_name="dev03")
    assert errno(client, dev03_in_123123, DEV03) == 1


def test_device_key_takes_over_device_level_tokens(
    env: tuple[Engine, httpx2.Client], client: httpx2.Client
) -> None:
    engine, _ = env
    with engine.begin() as conn:
        conn.execute(update(devices).where(devices.c.dev_id == DEV_ID).values(device_key=K2))
    # D4: device level -> the device key (K2 vectors now verify, K1 ones no longer) ...
    for vector in (8, 10, 12):
        assert errno(client, VECTORS[vector]) == 0
    for vector in (2, 4, 6):
        assert errno(client, VECTORS[vector]) == 1
    # ... product level -> still the product key.
    assert errno(client, VECTORS[3]) == 0
    assert errno(client, VECTORS[9]) == 1


def test_no_errno_1_leaks_through_other_endpoints(client: httpx2.Client) -> None:
    """The same rejection on every JSON endpoint, including E9 (P1 only)."""
    bad = SDK_AUTH.replace("sign=4", "sign=5")
    calls = [
        ("POST", "/ota/device/version", b'{"f_version":"1"}'),
        ("GET", "/ota/south/check?type=1&version=1", b""),
        ("GET", "/ota/south/tasking?type=1", b""),
        ("GET", "/ota/south/download/ota_aaaaaaaaaaaaaaaaaaaa/check", b""),
        ("POST", "/ota/south/device/download/ota_aaaaaaaaaaaaaaaaaaaa/progress", b'{"step":1}'),
        ("POST", "/ota/south/report?token=ota_aaaaaaaaaaaaaaaaaaaa", b'{"result":101}'),
        ("POST", "/ota/devInfo", b'{"pid":123123,"authInfo":"dev01"}'),
    ]
    for method, path, body in calls:
        sep = "&" if "?" in path else "?"
        response = client.request(
            method, f"{path}{sep}dev_id={DEV_ID}", content=body, headers={"Authorization": bad}
        )
        assert response.json() == {"errno": 1, "error": "auth failed"}, path


def poll_errno(client: httpx2.Client, authorization: str, dev_id: int) -> int:
    """E3, the cold poll: P1, P3 and the task read on one row (the caches are off here)."""
    response = client.get(
        "/ota/south/check",
        params={"type": 1, "version": "1.0.0", "dev_id": dev_id},
        headers={"Authorization": authorization},
    )
    assert response.status_code == 200
    return int(response.json()["errno"])


def test_the_cold_poll_binds_and_verifies_like_every_endpoint(
    env: tuple[Engine, httpx2.Client], client: httpx2.Client
) -> None:
    """§4.2, D4 on E3's one-read path: every signature and binding case of the tests above
    answers the same on the poll (its errno 1 is P1/P3's; 0 or 11 is a verified device, whose
    task the poll then looks up), a device key included."""
    engine, _ = env
    # res names 456456 but the sign is K1's, the key of 123123's devices: only P3 refuses it.
    foreign_res_own_key = _vector("products%2F456456", "sha1", VECTORS[3].rsplit("sign=", 1)[1])
    dev02 = auth.build_token("123123", K1, device_name="dev02")
    cases = [
        (RAW_3, DEV_ID, True),
        (SDK_AUTH, DEV03, False),
        (auth.build_token(OTHER_PID, K2), DEV03, True),
        (auth.build_token(OTHER_PID, K2), DEV_ID, False),
        (dev02, DEV02, True),
        (dev02, DEV_ID, False),
        (auth.build_token("123123", K1, device_name="ghost"), DEV_ID, False),
        (auth.build_token("123123", K1, et=T0 - 1), DEV_ID, False),
        (auth.build_user_token("7700001", K1), DEV_ID, False),
        (foreign_res_own_key, DEV_ID, False),
        (SDK_AUTH.replace("sign=4", "sign=5"), DEV_ID, False),
        (SDK_AUTH, 999, False),
    ]
    k1_vectors = [(VECTORS[n], DEV_ID, n <= 6) for n in range(1, 13)]
    for authorization, dev_id, verified in k1_vectors + cases:
        assert (poll_errno(client, authorization, dev_id) != 1) is verified, (authorization, dev_id)
    with engine.begin() as conn:  # D4: the device key verifies dev01's device-level tokens
        conn.execute(update(devices).where(devices.c.dev_id == DEV_ID).values(device_key=K2))
    # Device level: K2's vectors (even, 8-12) now; product level: still K1's (odd, 1-5).
    k2_vectors = [(VECTORS[n], DEV_ID, n in (1, 3, 5, 8, 10, 12)) for n in range(1, 13)]
    for authorization, dev_id, verified in k2_vectors + cases:
        assert (poll_errno(client, authorization, dev_id) != 1) is verified, (authorization, dev_id)
