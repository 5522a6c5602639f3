"""OneNET Authorization tokens: every vector of spec Appendix B.1, the raw form, and rejections."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from onenet_ota import auth

K1 = "MHEoPy2atlp4V/zqE09jYh/16aWJQkQjtgLsFaCnfvg="
K2 = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
P = "version=2018-10-31&res=products%2F123123"
D = "version=2018-10-31&res=products%2F123123%2Fdevices%2Fdev01"
T = "&et=2524579200&method="

VECTORS = [
    (K1, "md5", None, f"{P}{T}md5&sign=aD7EBzDi3gnhTuI186DKYw%3D%3D"),
    (K1, "md5", "dev01", f"{D}{T}md5&sign=z%2FkpB%2FSLmqQ71CDM50uQXg%3D%3D"),
    (K1, "sha1", None, f"{P}{T}sha1&sign=4%2B7IKBIL5vNCYd9mzZZg40vs9vc%3D"),
    (K1, "sha1", "dev01", f"{D}{T}sha1&sign=37MTwnM8%2Fn9AhfAk1EWPEevSNIc%3D"),
    (
        K1,
        "sha256",
        None,
        f"{P}{T}sha256&sign=nLZr%2B%2FyCWPyEQSlZJ%2Fje4188nsXcGxe059ZepgN25Zk%3D",
    ),
    (
        K1,
        "sha256",
        "dev01",
        f"{D}{T}sha256&sign=ZqklpThdPTsziNTwCdXtU%2FF2O6mtpcYTF3MT8DudRi8%3D",
    ),
    (K2, "md5", None, f"{P}{T}md5&sign=NrDYedTmz6fydYJkUVeNow%3D%3D"),
    (K2, "md5", "dev01", f"{D}{T}md5&sign=O4MbVybkrZaaV6xdwVjwqw%3D%3D"),
    (K2, "sha1", None, f"{P}{T}sha1&sign=4rDtm2uJARRfB1uyCq4%2BBQxSca0%3D"),
    (K2, "sha1", "dev01", f"{D}{T}sha1&sign=K7ik2Mrqey7J7PVgySodOijEKFg%3D"),
    (
        K2,
        "sha256",
        None,
        f"{P}{T}sha256&sign=vBi19Qi1PKeZ%2BgeOh6pdpjOMB8gMyDAi7RIb8GyffCc%3D",
    ),
    (
        K2,
        "sha256",
        "dev01",
        f"{D}{T}sha256&sign=S7wQDI5HloHl791MHm%2FHItCI5yK1aAD5ZYU6jiEDJwQ%3D",
    ),
]
NOW = 1_700_000_000


@pytest.mark.parametrize(("key", "method", "device", "expected"), VECTORS)
def test_build_token_matches_c_sdk_vectors(
    key: str, method: str, device: str | None, expected: str
) -> None:
    assert auth.build_token("123123", key, device_name=device, method=method) == expected


@pytest.mark.parametrize(("key", "method", "device", "expected"), VECTORS)
def test_vectors_parse_and_verify(key: str, method: str, device: str | None, expected: str) -> None:
    parsed = auth.parse_token(expected)
    assert parsed.product_id == "123123"
    assert parsed.device_name == device
    assert parsed.method == method
    auth.verify_token(parsed, auth.decode_key(key), now=NOW)


def test_string_to_sign_of_vector_3() -> None:
    sign = auth.compute_sign(
        auth.decode_key(K1), et="2524579200", method="sha1", res="products/123123"
    )
    assert sign == "4+7IKBIL5vNCYd9mzZZg40vs9vc="


def test_raw_form_verifies_like_the_encoded_one() -> None:
    raw = (
        "version=2018-10-31&res=products/123123&et=2524579200&method=sha1"
        "&sign=4+7IKBIL5vNCYd9mzZZg40vs9vc="
    )
    parsed = auth.parse_token(raw)
    auth.verify_token(parsed, auth.decode_key(K1), now=NOW)
    assert parsed.sign == "4+7IKBIL5vNCYd9mzZZg40vs9vc="


def test_fields_in_any_order_and_unknown_keys_ignored() -> None:
    token = (
        "sign=4%2B7IKBIL5vNCYd9mzZZg40vs9vc%3D&&method=sha1&x=1&et=2524579200"
        "&res=products%2F123123&version=2018-10-31"
    )
    auth.verify_token(auth.parse_token(token), auth.decode_key(K1), now=NOW)


def test_lower_case_hex_escapes_are_accepted() -> None:
    token = VECTORS[2][3].replace("%2F", "%2f").replace("%2B", "%2b").replace("%3D", "%3d")
    auth.verify_token(auth.parse_token(token), auth.decode_key(K1), now=NOW)


VECTOR_3 = VECTORS[2][3]


@pytest.mark.parametrize(
    "token",
    [
        VECTOR_3.replace("et=2524579200", "et=2524579201"),
        VECTOR_3.replace("method=sha1", "method=sha256"),
        VECTOR_3.replace("%2B", " "),  # '+' decoded as a space by a careless parser
        VECTOR_3.replace("%2B", "%20"),
        VECTOR_3.replace("res=products%2F123123", "res=products%2F123124"),
    ],
)
def test_tampered_tokens_fail_verification(token: str) -> None:
    with pytest.raises(auth.TokenError):
        auth.verify_token(auth.parse_token(token), auth.decode_key(K1), now=NOW)


def test_another_products_key_fails() -> None:
    with pytest.raises(auth.TokenError, match="signature"):
        auth.verify_token(auth.parse_token(VECTOR_3), auth.decode_key(K2), now=NOW)


def test_expired_et_fails_and_et_equal_to_now_passes() -> None:
    token = auth.build_token("123123", K1, et=NOW - 1)
    with pytest.raises(auth.TokenError, match="expired"):
        auth.verify_token(auth.parse_token(token), auth.decode_key(K1), now=NOW)
    token = auth.build_token("123123", K1, et=NOW)
    auth.verify_token(auth.parse_token(token), auth.decode_key(K1), now=NOW)


def test_et_above_32_bits_is_parsed_as_64_bit() -> None:
    token = auth.build_token("123123", K1, et=7555917657)
    parsed = auth.parse_token(token)
    assert parsed.expires_at == 7555917657
    auth.verify_token(parsed, auth.decode_key(K1), now=NOW)


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("", "missing"),
        (VECTOR_3.replace("version=2018-10-31", "version=2022-05-01"), "version"),
        (VECTOR_3.replace("method=sha1", "method=hmacsha1"), "method"),
        (VECTOR_3.replace("et=2524579200", "et=-1"), "et"),
        (VECTOR_3.replace("et=2524579200", "et=99999999999999999999"), "et"),
        (VECTOR_3.replace("et=2524579200", "et=12a"), "et"),
        (VECTOR_3.replace("res=products%2F123123", "res=products%2F%2F123123"), "res"),
        (VECTOR_3.replace("res=products%2F123123", "res=devices%2F123123"), "res"),
        (VECTOR_3 + "&et=1", "repeated"),
        (VECTOR_3.replace("&method=sha1", ""), "lacks method"),
        (VECTOR_3 + "&junk", "without '='"),
        (VECTOR_3.replace("%3D", "%3"), "percent"),
        (VECTOR_3.replace("%2B", "%ZZ"), "percent"),
        (VECTOR_3.replace("%2B", "%FF"), "UTF-8"),
        (VECTOR_3.replace("res=products%2F123123", "res=products%2F123123%2Fdevices%2F"), "res"),
    ],
)
def test_malformed_tokens_are_refused_with_a_reason(token: str, message: str) -> None:
    with pytest.raises(auth.TokenError, match=message):
        auth.parse_token(token)


def test_error_messages_and_repr_never_contain_the_sign() -> None:
    parsed = auth.parse_token(VECTOR_3)
    assert "4+7IKBIL" not in repr(parsed)
    with pytest.raises(auth.TokenError) as excinfo:
        auth.verify_token(parsed, auth.decode_key(K2), now=NOW)
    assert "4+7IKBIL" not in str(excinfo.value)
    assert "4%2B7IKBIL" not in auth.redact(VECTOR_3)
    assert auth.redact(VECTOR_3).endswith("sign=***")


@pytest.mark.parametrize("bad_key", ["not base64!", "", "QQ"])
def test_invalid_access_keys_are_refused_before_signing(bad_key: str) -> None:
    with pytest.raises(ValueError, match="access key"):
        auth.build_token("123123", bad_key)


def test_invalid_resource_and_method_are_refused() -> None:
    with pytest.raises(ValueError, match="invalid product id"):
        auth.build_token("12/3", K1)
    with pytest.raises(ValueError, match="unsupported method"):
        auth.build_token("123123", K1, method="sha512")


@given(st.text())
def test_onenet_quote_round_trips(value: str) -> None:
    assert auth.onenet_unquote(auth.onenet_quote(value)) == value


@pytest.mark.parametrize(
    ("encoded", "decoded"),
    [
        ("products%2F123123", "products/123123"),
        ("a%2fb", "a/b"),  # either case
        ("a+b", "a+b"),  # "+" is not a space (§3.3 step 3)
        ("%E4%B8%AD", "\u4e2d"),
        ("plain", "plain"),
        ("%25", "%"),
    ],
)
def test_unquote_table(encoded: str, decoded: str) -> None:
    assert auth.onenet_unquote(encoded) == decoded


@pytest.mark.parametrize("encoded", ["%", "a%2", "%zz", "%2g", "%%41", "%\u0661\u0662", "%FF"])
def test_unquote_refuses_broken_escapes_and_non_utf8(encoded: str) -> None:
    with pytest.raises(auth.TokenError):
        auth.onenet_unquote(encoded)


def _reference_unquote(value: str) -> str:
    """§3.3 step 3 spelled out byte by byte (the first implementation), as the model."""
    out, raw, i = bytearray(), value.encode("utf-8"), 0
    while i < len(raw):
        if raw[i] == 0x25:
            pair = raw[i + 1 : i + 3].decode("ascii", "replace")
            if len(pair) != 2 or not set(pair) <= set("0123456789abcdefABCDEF"):
                raise auth.TokenError("bad escape")
            out.append(int(pair, 16))
            i += 3
        else:
            out.append(raw[i])
            i += 1
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise auth.TokenError("not UTF-8") from None


@given(st.text(alphabet=st.sampled_from("%2Fafg0+\u0661\u4e2dE4B8AD"), max_size=12) | st.text())
def test_unquote_agrees_with_the_byte_by_byte_model(value: str) -> None:
    try:
        expected: str | None = _reference_unquote(value)
    except auth.TokenError:
        expected = None
    try:
        got: str | None = auth.onenet_unquote(value)
    except auth.TokenError:
        got = None
    assert got == expected


@given(st.text())
def test_parse_token_never_raises_anything_but_token_error(value: str) -> None:
    with contextlib.suppress(auth.TokenError):
        auth.parse_token(value)


@given(
    key=st.binary(min_size=1, max_size=64),
    pid=st.from_regex(r"[A-Za-z0-9]{1,32}", fullmatch=True),
    device=st.none() | st.from_regex(r"[A-Za-z0-9_.\-]{1,64}", fullmatch=True),
    method=st.sampled_from(auth.METHODS),
    et=st.integers(min_value=NOW, max_value=2**63 - 1),
)
def test_every_built_token_verifies(
    key: bytes, pid: str, device: str | None, method: str, et: int
) -> None:
    import base64

    access_key = base64.b64encode(key).decode()
    token = auth.build_token(pid, access_key, device_name=device, method=method, et=et)
    parsed = auth.parse_token(token)
    assert (parsed.product_id, parsed.device_name) == (pid, device)
    auth.verify_token(parsed, key, now=NOW)
