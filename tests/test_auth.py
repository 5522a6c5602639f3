"""OneNET Authorization tokens: every vector of spec Appendix B.1, the raw form, and rejections."""

from __future__ import annotations

import base64
import contextlib
import functools
import hmac
import urllib.parse

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
    access_key = base64.b64encode(key).decode()
    token = auth.build_token(pid, access_key, device_name=device, method=method, et=et)
    parsed = auth.parse_token(token)
    assert (parsed.product_id, parsed.device_name) == (pid, device)
    auth.verify_token(parsed, key, now=NOW)


# -- 2022-05-01 and userid/{uid} (§3.3, §13.3) ---------------------------------------------------
# The signs below were computed outside Python, with ``openssl dgst -<method> -mac HMAC -macopt
# hexkey:<key bytes> -binary | base64`` over ``2524579200\n<method>\n<res>\n2022-05-01``.
USER_RES = "userid/34268"
DEVICE_RES = "products/123123/devices/dev01"
PRODUCT_RES = "products/123123"
NEW_VECTORS = [
    (K1, "md5", USER_RES, "GHjm+NQbmxvIyek3CfD9Ng=="),
    (K1, "md5", DEVICE_RES, "2wG0LbAKASBkdhC8nkXJZg=="),
    (K1, "md5", PRODUCT_RES, "c1avncB1K7qqQKksrdwmHw=="),
    (K1, "sha1", USER_RES, "FRet4jap35z8ieJaTg7hddtoYIg="),
    (K1, "sha1", DEVICE_RES, "UxEOOa/OFb0v6LnKbbQ0Nh7IyMg="),
    (K1, "sha1", PRODUCT_RES, "B5QIznN+yHj8nI91I26eqHU5iCI="),
    (K1, "sha256", USER_RES, "cxFQKlYsOYN/DJrDY0mrWCkcFGQJUcaSBD8EANQ93iI="),
    (K1, "sha256", DEVICE_RES, "8ReH8+237IO8pzBJJTHmvBHOaVYWh3i5PLU2ffu01ZQ="),
    (K1, "sha256", PRODUCT_RES, "BmGD7DHvPeJZI/Ix716YnqoSghV9rQIsRcuaiwMfeM8="),
    (K2, "md5", USER_RES, "LConN1idDe+ILFVg2N+PRA=="),
    (K2, "md5", DEVICE_RES, "ZW7S2Q0dSPKOHGWke1w8KQ=="),
    (K2, "md5", PRODUCT_RES, "8hzEHJaaTWx+yISRJZzrPA=="),
    (K2, "sha1", USER_RES, "iahzhaV3tqT43GEdcUVBiT1spjg="),
    (K2, "sha1", DEVICE_RES, "Dvk0+9EoI3CtDYOyOVH94k15MPY="),
    (K2, "sha1", PRODUCT_RES, "zKjzCy0R74pjhNjKjlaM5+SzTeU="),
    (K2, "sha256", USER_RES, "GVyz9MUEZcamnqT0L3mQK13T5+ZTLNB+wjhJjIjnwr0="),
    (K2, "sha256", DEVICE_RES, "5KtU0q7K0azht7kPiejrVgd7+znheB2TtNXpze46arw="),
    (K2, "sha256", PRODUCT_RES, "4ansS+1U8GEX924uunQbFw1GTUOBKYZ5h/ZOmJsqZ+c="),
]
# userid/34268 with version 2018-10-31 (F2 takes either version with every form), K1, sha1.
USER_2018_SIGN = "Cq5ns5pQIuQvURELTUR2uEO2zmU="


def _independent_sign(key: str, et: str, method: str, res: str, version: str) -> str:
    """§3.2 steps 1-3 with hmac and base64 only, not through the module under test."""
    message = f"{et}\n{method}\n{res}\n{version}".encode()
    return base64.b64encode(hmac.new(base64.b64decode(key), message, method).digest()).decode()


def _independent_token(res: str, method: str, sign: str, version: str, et: int = 2524579200) -> str:
    """§3.2 step 4 with urllib's quote (equal to OneNET's table for these characters)."""
    q = functools.partial(urllib.parse.quote, safe="")
    return f"version={version}&res={q(res)}&et={et}&method={method}&sign={q(sign)}"


def _build(key: str, method: str, res: str, version: str, et: int = auth.DEFAULT_ET) -> str:
    parts = res.split("/")
    if parts[0] == "userid":
        return auth.build_user_token(parts[1], key, method=method, version=version, et=et)
    device = parts[3] if len(parts) == 4 else None
    return auth.build_token(
        parts[1], key, device_name=device, method=method, version=version, et=et
    )


@pytest.mark.parametrize(("key", "method", "res", "sign"), NEW_VECTORS)
def test_2022_vectors_are_the_independent_hmac(key: str, method: str, res: str, sign: str) -> None:
    assert _independent_sign(key, "2524579200", method, res, auth.VERSION_2022) == sign


@pytest.mark.parametrize(("key", "method", "res", "sign"), NEW_VECTORS)
def test_2022_tokens_build_as_the_vectors(key: str, method: str, res: str, sign: str) -> None:
    expected = _independent_token(res, method, sign, auth.VERSION_2022)
    assert _build(key, method, res, auth.VERSION_2022) == expected


@pytest.mark.parametrize(("key", "method", "res", "sign"), NEW_VECTORS)
@pytest.mark.parametrize("encoded", [True, False], ids=["encoded", "raw"])
def test_2022_vectors_parse_and_verify_in_both_encodings(
    key: str, method: str, res: str, sign: str, encoded: bool
) -> None:
    if encoded:
        value = _independent_token(res, method, sign, auth.VERSION_2022)
    else:  # §3.3 step 3: the raw form with literal "/", "+" and "="
        value = f"version=2022-05-01&res={res}&et=2524579200&method={method}&sign={sign}"
    token = auth.parse_any_token(value, policy=auth.FUSE_POLICY)
    assert (token.version, token.res, token.method, token.sign) == (
        auth.VERSION_2022,
        res,
        method,
        sign,
    )
    auth.verify_token(token, auth.decode_key(key), now=NOW)
    other = K2 if key == K1 else K1
    with pytest.raises(auth.TokenError, match="signature"):
        auth.verify_token(token, auth.decode_key(other), now=NOW)


def test_user_token_with_the_classic_version() -> None:
    assert _independent_sign(K1, "2524579200", "sha1", USER_RES, auth.VERSION) == USER_2018_SIGN
    value = _independent_token(USER_RES, "sha1", USER_2018_SIGN, auth.VERSION)
    assert auth.build_user_token("34268", K1, version=auth.VERSION) == value
    token = auth.parse_any_token(value)
    assert isinstance(token, auth.UserToken)
    assert token.user_id == "34268"
    assert auth.key_source(token) is auth.KeySource.ACCOUNT
    auth.verify_token(token, auth.decode_key(K1), now=NOW)


@pytest.mark.parametrize(("key", "method", "device", "expected"), VECTORS)
def test_appendix_b1_vectors_verify_under_every_policy(
    key: str, method: str, device: str | None, expected: str
) -> None:
    for policy in (auth.CLASSIC_POLICY, auth.STUDIO_POLICY, auth.FUSE_POLICY):
        token = auth.parse_any_token(expected, policy=policy)
        assert isinstance(token, auth.ParsedToken)
        assert token.device_name == device
        auth.verify_token(token, auth.decode_key(key), now=NOW)


def test_version_is_signed_a_2022_token_relabelled_2018_fails() -> None:
    value = _build(K1, "sha1", DEVICE_RES, auth.VERSION_2022)
    relabelled = value.replace("version=2022-05-01", "version=2018-10-31")
    with pytest.raises(auth.TokenError, match="signature"):
        auth.verify_token(auth.parse_token(relabelled), auth.decode_key(K1), now=NOW)


# Which policy takes which (version, resource) pair: D3 + Appendix B.1 (classic), S2, F2.
POLICY_TABLE = [
    # (policy, version, res, accepted)
    (auth.CLASSIC_POLICY, auth.VERSION, PRODUCT_RES, True),
    (auth.CLASSIC_POLICY, auth.VERSION, DEVICE_RES, True),
    (auth.CLASSIC_POLICY, auth.VERSION, USER_RES, False),
    (auth.CLASSIC_POLICY, auth.VERSION_2022, PRODUCT_RES, False),  # B.1's last negative case
    (auth.CLASSIC_POLICY, auth.VERSION_2022, DEVICE_RES, False),
    (auth.CLASSIC_POLICY, auth.VERSION_2022, USER_RES, False),
    (auth.STUDIO_POLICY, auth.VERSION, PRODUCT_RES, True),
    (auth.STUDIO_POLICY, auth.VERSION, DEVICE_RES, True),
    (auth.STUDIO_POLICY, auth.VERSION, USER_RES, False),
    (auth.STUDIO_POLICY, auth.VERSION_2022, PRODUCT_RES, True),
    (auth.STUDIO_POLICY, auth.VERSION_2022, DEVICE_RES, True),
    (auth.STUDIO_POLICY, auth.VERSION_2022, USER_RES, False),
    (auth.FUSE_POLICY, auth.VERSION, PRODUCT_RES, True),
    (auth.FUSE_POLICY, auth.VERSION, DEVICE_RES, True),
    (auth.FUSE_POLICY, auth.VERSION, USER_RES, True),
    (auth.FUSE_POLICY, auth.VERSION_2022, PRODUCT_RES, True),
    (auth.FUSE_POLICY, auth.VERSION_2022, DEVICE_RES, True),
    (auth.FUSE_POLICY, auth.VERSION_2022, USER_RES, True),
]


@pytest.mark.parametrize(("policy", "version", "res", "accepted"), POLICY_TABLE)
def test_policies_accept_exactly_their_versions_and_resources(
    policy: auth.TokenPolicy, version: str, res: str, accepted: bool
) -> None:
    value = _build(K1, "sha1", res, version)
    if accepted:
        auth.verify_token(auth.parse_any_token(value, policy=policy), auth.decode_key(K1), now=NOW)
    else:
        with pytest.raises(auth.TokenError, match=r"version|level"):
            auth.parse_any_token(value, policy=policy)


def test_parse_token_keeps_its_classic_default_and_never_returns_an_account() -> None:
    with pytest.raises(auth.TokenError, match="version"):
        auth.parse_token(_build(K1, "sha1", DEVICE_RES, auth.VERSION_2022))
    parsed = auth.parse_token(
        _build(K1, "sha1", DEVICE_RES, auth.VERSION_2022), policy=auth.STUDIO_POLICY
    )
    assert (parsed.product_id, parsed.device_name) == ("123123", "dev01")
    with pytest.raises(auth.TokenError, match="res"):
        auth.parse_token(_build(K1, "sha1", USER_RES, auth.VERSION_2022), policy=auth.FUSE_POLICY)


USER_2022 = _independent_token(USER_RES, "sha1", "FRet4jap35z8ieJaTg7hddtoYIg=", "2022-05-01")
DEVICE_2022 = _independent_token(DEVICE_RES, "sha1", "UxEOOa/OFb0v6LnKbbQ0Nh7IyMg=", "2022-05-01")


# Malformed tokens of every form, under the policy that would otherwise accept them.
@pytest.mark.parametrize(
    ("value", "message"),
    [
        (USER_2022.replace("userid%2F34268", "userid%2F"), "res"),
        (USER_2022.replace("userid%2F34268", "userid%2F0"), "res"),
        (USER_2022.replace("userid%2F34268", "userid%2F034268"), "res"),  # leading zero
        (USER_2022.replace("userid%2F34268", "userid%2F-1"), "res"),
        (USER_2022.replace("userid%2F34268", "userid%2F%2B1"), "res"),
        (USER_2022.replace("userid%2F34268", "userid%2F3426a"), "res"),
        (USER_2022.replace("userid%2F34268", "userid%2F9223372036854775808"), "res"),  # 2^63
        (USER_2022.replace("userid%2F34268", "userid%2F12345678901234567890"), "res"),
        (USER_2022.replace("userid%2F34268", "userid%2F34268%2F"), "res"),
        (USER_2022.replace("userid%2F34268", "userid%2F34268%2Fx"), "res"),
        (USER_2022.replace("userid%2F34268", "userid%2F%2F34268"), "res"),
        (USER_2022.replace("userid%2F34268", "userid"), "res"),
        (USER_2022.replace("userid%2F34268", "users%2F34268"), "res"),
        (USER_2022.replace("userid%2F34268", "UserId%2F34268"), "res"),
        (USER_2022.replace("userid%2F34268", "userid%2F34268%20"), "res"),
        (DEVICE_2022.replace("dev01", ""), "res"),
        (DEVICE_2022.replace("dev01", "d" * 65), "res"),
        (DEVICE_2022.replace("dev01", "dev%2001"), "res"),
        (DEVICE_2022.replace("dev01", "dev01%2Fx"), "res"),
        (DEVICE_2022.replace("%2Fdevices%2F", "%2Fdevice%2F"), "res"),
        (DEVICE_2022.replace("123123", "1" * 33), "res"),
        (DEVICE_2022.replace("123123", "12_123"), "res"),
        (DEVICE_2022.replace("products%2F", "products%2F%2F"), "res"),
        (DEVICE_2022.replace("version=2022-05-01", "version=2022-5-1"), "version"),
        (DEVICE_2022.replace("version=2022-05-01", "version=2022-05-01%20"), "version"),
        (DEVICE_2022.replace("version=2022-05-01", "version="), "version"),
        (DEVICE_2022.replace("version=2022-05-01", "Version=2022-05-01"), "lacks version"),
        (DEVICE_2022.replace("method=sha1", "method=SHA1"), "method"),
        (DEVICE_2022.replace("method=sha1", "method=sha512"), "method"),
        (DEVICE_2022.replace("et=2524579200", "et="), "et"),
        (DEVICE_2022.replace("et=2524579200", "et=%2B2524579200"), "et"),
        (DEVICE_2022.replace("et=2524579200", "et=2524579200.0"), "et"),
        (DEVICE_2022.replace("et=2524579200", "et=9223372036854775808"), "et"),
        (USER_2022 + "&res=userid%2F1", "repeated"),
        (USER_2022.replace("&sign=", "&sig="), "lacks sign"),
        (USER_2022.replace("%2F", "%2G"), "percent"),
        (USER_2022.replace("%2F", "%C3%28"), "UTF-8"),
        (USER_2022 + "&novalue", "without '='"),
    ],
)
def test_malformed_tokens_of_every_form_are_refused(value: str, message: str) -> None:
    with pytest.raises(auth.TokenError, match=message):
        auth.parse_any_token(value, policy=auth.FUSE_POLICY)


def test_expiry_is_inclusive_for_every_form() -> None:
    for res in (PRODUCT_RES, DEVICE_RES, USER_RES):
        for version in auth.VERSIONS:
            at_now = auth.parse_any_token(_build(K1, "md5", res, version, et=NOW))
            auth.verify_token(at_now, auth.decode_key(K1), now=NOW)  # et >= now (§3.3 step 6)
            with pytest.raises(auth.TokenError, match="expired"):
                auth.verify_token(at_now, auth.decode_key(K1), now=NOW + 0.5)


@pytest.mark.parametrize("bad", ["", "0", "007", "-1", "1.5", "12a", str(2**63), "1/2"])
def test_user_resource_refuses_bad_uids(bad: str) -> None:
    with pytest.raises(ValueError, match="user id"):
        auth.build_user_token(bad, K1)


def test_unknown_versions_are_refused_when_building() -> None:
    with pytest.raises(ValueError, match="version"):
        auth.build_token("123123", K1, version="2024-01-01")
    with pytest.raises(ValueError, match="version"):
        auth.build_user_token("1", K1, version="")


@pytest.mark.parametrize(
    ("res", "source"),
    [
        (PRODUCT_RES, auth.KeySource.PRODUCT),
        (DEVICE_RES, auth.KeySource.DEVICE_OR_PRODUCT),
        (USER_RES, auth.KeySource.ACCOUNT),
    ],
)
def test_key_source_follows_3_4(res: str, source: auth.KeySource) -> None:
    assert (
        auth.key_source(auth.parse_any_token(_build(K1, "sha1", res, auth.VERSION_2022))) is source
    )


@pytest.mark.parametrize(
    ("res", "pid", "name", "owner", "granted"),
    [
        (PRODUCT_RES, "123123", "dev01", None, True),
        (PRODUCT_RES, "123123", "other", None, True),
        (PRODUCT_RES, "123124", "dev01", None, False),
        (DEVICE_RES, "123123", "dev01", None, True),
        (DEVICE_RES, "123123", "dev02", None, False),  # S2: a device token names its device
        (DEVICE_RES, "999", "dev01", None, False),
        (USER_RES, "123123", "dev01", "34268", True),  # F2: every device of its products
        (USER_RES, "555", "anything", "34268", True),
        (USER_RES, "123123", "dev01", "34269", False),
        (USER_RES, "123123", "dev01", None, False),  # a product no account owns
    ],
)
def test_grants(res: str, pid: str, name: str, owner: str | None, granted: bool) -> None:
    token = auth.parse_any_token(_build(K1, "sha1", res, auth.VERSION_2022))
    assert auth.grants(token, pid=pid, device_name=name, product_owner=owner) is granted


def test_user_token_repr_and_errors_never_contain_the_sign() -> None:
    token = auth.parse_any_token(USER_2022)
    assert "FRet4jap" not in repr(token)
    assert repr(token).startswith("UserToken(res='userid/34268'")
    assert auth.redact(USER_2022).endswith("sign=***")


resources = st.one_of(
    st.builds(lambda pid: f"products/{pid}", st.from_regex(r"[A-Za-z0-9]{1,32}", fullmatch=True)),
    st.builds(
        lambda pid, name: f"products/{pid}/devices/{name}",
        st.from_regex(r"[A-Za-z0-9]{1,32}", fullmatch=True),
        st.from_regex(r"[A-Za-z0-9_.\-]{1,64}", fullmatch=True),
    ),
    st.builds(lambda uid: f"userid/{uid}", st.integers(1, 2**63 - 1)),
)


@given(
    key=st.binary(min_size=1, max_size=64),
    res=resources,
    method=st.sampled_from(auth.METHODS),
    version=st.sampled_from(auth.VERSIONS),
    et=st.integers(min_value=NOW, max_value=2**63 - 1),
    raw=st.booleans(),
)
def test_every_form_round_trips_and_matches_the_independent_sign(
    key: bytes, res: str, method: str, version: str, et: int, raw: bool
) -> None:
    access_key = base64.b64encode(key).decode()
    value = _build(access_key, method, res, version, et=et)
    sign = _independent_sign(access_key, str(et), method, res, version)
    assert value == _independent_token(res, method, sign, version, et)
    if raw:
        value = f"version={version}&res={res}&et={et}&method={method}&sign={sign}"
    token = auth.parse_any_token(value, policy=auth.FUSE_POLICY)
    assert (token.res, token.et, token.method, token.version, token.sign) == (
        res,
        str(et),
        method,
        version,
        sign,
    )
    kind = (
        auth.ResourceKind.USER
        if res.startswith("userid/")
        else auth.ResourceKind.DEVICE
        if "/devices/" in res
        else auth.ResourceKind.PRODUCT
    )
    assert token.kind is kind
    auth.verify_token(token, key, now=NOW)
    with pytest.raises(auth.TokenError, match="signature"):
        # HMAC pads short keys with zeros, so another key must differ in a byte, not in length.
        auth.verify_token(token, bytes([key[0] ^ 1]) + key[1:], now=NOW)


@given(st.text())
def test_parse_any_token_never_raises_anything_but_token_error(value: str) -> None:
    with contextlib.suppress(auth.TokenError):
        auth.parse_any_token(value)


@pytest.mark.parametrize(("key", "method", "device", "expected"), VECTORS)
def test_every_b1_vector_expires_after_its_et(
    key: str, method: str, device: str | None, expected: str
) -> None:
    # Appendix B.1 negative case: "any vector with et in the past".
    token = auth.parse_token(expected)
    auth.verify_token(token, auth.decode_key(key), now=2524579200)
    with pytest.raises(auth.TokenError, match="expired"):
        auth.verify_token(token, auth.decode_key(key), now=2524579201)
