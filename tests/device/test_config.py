"""Configuration value objects: validation before anything is sent, and credentials."""

from __future__ import annotations

from typing import Any

import pytest

from onenet_ota.device import Credentials, DeviceConfig, InvalidArgumentError, TaskType, Timeout
from tests.device.conftest import K1, VECTOR_3, make_config

K2 = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="


@pytest.mark.parametrize(
    ("key", "method", "device", "sign"),
    [
        (K1, "md5", None, "aD7EBzDi3gnhTuI186DKYw%3D%3D"),
        (K1, "sha1", "dev01", "37MTwnM8%2Fn9AhfAk1EWPEevSNIc%3D"),
        (K1, "sha256", None, "nLZr%2B%2FyCWPyEQSlZJ%2Fje4188nsXcGxe059ZepgN25Zk%3D"),
        (K2, "sha256", "dev01", "S7wQDI5HloHl791MHm%2FHItCI5yK1aAD5ZYU6jiEDJwQ%3D"),
    ],
)
def test_credentials_from_an_access_key_match_appendix_b1(
    key: str, method: str, device: str | None, sign: str
) -> None:
    credentials = Credentials.from_access_key("123123", key, device_name=device, method=method)
    res = "products%2F123123" + (f"%2Fdevices%2F{device}" if device else "")
    assert credentials.authorization == (
        f"version=2018-10-31&res={res}&et=2524579200&method={method}&sign={sign}"
    )
    assert credentials.product_id == "123123"


def test_default_credentials_are_the_c_sdks() -> None:
    assert Credentials.from_access_key("123123", K1).authorization == VECTOR_3


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("123123", "not base64!"), {}, "base64"),
        (("123123", ""), {}, "base64|empty"),
        (("12/3", K1), {}, "product id"),
        (("123123", K1), {"device_name": "a b"}, "device name"),
        (("123123", K1), {"method": "sha512"}, "method"),
        (("123123", K1), {"et": -1}, "et"),
    ],
)
def test_bad_keys_fail_clearly(args: tuple[str, str], kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message) as info:
        Credentials.from_access_key(*args, **kwargs)
    assert K1 not in str(info.value)


@pytest.mark.parametrize("value", ["", "has space", "line\r\nX-Evil: 1", "ключ", 42])
def test_a_ready_value_must_be_a_safe_header_value(value: Any) -> None:
    with pytest.raises(InvalidArgumentError, match="Authorization"):
        Credentials(value)


def test_credentials_repr_is_redacted() -> None:
    text = repr(Credentials.from_access_key("123123", K1))
    assert "sign=***" in text
    assert "4%2B7IKBIL5vNCYd9mzZZg40vs9vc" not in text
    assert "4%2B7IKBIL5vNCYd9mzZZg40vs9vc" not in repr(make_config())
    assert Credentials("opaque").product_id is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"dev_id": "0"}, "dev_id"),
        ({"dev_id": "12a"}, "dev_id"),
        ({"dev_id": "9223372036854775808"}, "dev_id"),
        ({"dev_id": 987654321}, "dev_id"),
        ({"version": ""}, "version"),
        ({"version": "1.0.0 beta"}, "version"),
        ({"version": "v" * 21}, "version"),
        ({"version": "版本1"}, "version"),
        ({"other_version": "1/0"}, "other_version"),
        ({"type": 3}, "type"),
        ({"type": True}, "type"),
        ({"type": "1"}, "type"),
        ({"manuf": ""}, "manuf"),
        ({"model": "x" * 33}, "model"),
        ({"cdn": "true"}, "cdn"),
        ({"credentials": VECTOR_3}, "credentials"),
    ],
)
def test_bad_device_config(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        make_config(**changes)


def test_versions_by_type() -> None:
    fota = make_config()
    assert (fota.f_version, fota.s_version) == ("1.0.0", None)
    sota = make_config(type=2, other_version="9")
    assert sota.type is TaskType.SOTA
    assert (sota.f_version, sota.s_version) == ("9", "1.0.0")


def test_config_is_immutable() -> None:
    config = make_config()
    with pytest.raises(AttributeError):
        config.version = "2"  # type: ignore[misc]
    assert DeviceConfig(credentials=config.credentials, dev_id=None, version="1").dev_id is None


def test_timeout() -> None:
    assert Timeout().ms == 3000
    assert Timeout(1500).seconds == 1.5
    assert Timeout(1500).connect_seconds == 1.5
    assert Timeout(1500, connect_ms=200).connect_seconds == 0.2
    assert Timeout(1500).with_ms(None) == Timeout(1500)
    assert Timeout(1500, 200).with_ms(10) == Timeout(10, 200)
    for bad in (0, -1, True, 1.5, 10**12):
        with pytest.raises(InvalidArgumentError):
            Timeout(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        Timeout(100, connect_ms=0)
