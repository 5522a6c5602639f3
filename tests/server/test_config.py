"""server/config.py: Settings from arguments and ONENET_OTA_* variables."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from onenet_ota.server.config import DEFAULT_MAX_UPLOAD_BYTES, Settings
from onenet_ota.server.device_service import DEFAULT_CACHE_TTL

SECRET = "a-long-enough-admin-token"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("ONENET_OTA_"):
            monkeypatch.delenv(name)


def test_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = Settings()
    # Loopback unless told otherwise: a fresh install is not on the network by accident.
    assert (settings.host, settings.port, settings.workers) == ("127.0.0.1", 8080, 1)
    assert settings.database_url == f"sqlite:///{tmp_path / 'data' / 'onenet-ota.db'}"
    assert settings.packages_dir == tmp_path / "data" / "packages"
    assert settings.max_upload_bytes == DEFAULT_MAX_UPLOAD_BYTES
    assert settings.admin_token is None
    assert not settings.tls
    assert settings.cache_ttl == DEFAULT_CACHE_TTL  # the device API's own default


def test_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONENET_OTA_PORT", "9000")
    monkeypatch.setenv("ONENET_OTA_DB", "postgresql://ota@db/ota")
    monkeypatch.setenv("ONENET_OTA_PUBLIC_ADDRESS", "ota.example.net:80")
    monkeypatch.setenv("ONENET_OTA_ADMIN_TOKEN", SECRET)
    monkeypatch.setenv("ONENET_OTA_WORKERS", "4")
    monkeypatch.setenv("ONENET_OTA_CACHE_TTL", "0")
    settings = Settings()
    assert settings.port == 9000
    assert settings.database_url == "postgresql://ota@db/ota"
    assert settings.public_address == "ota.example.net:80"
    assert settings.workers == 4
    assert settings.cache_ttl == 0
    assert settings.admin_token is not None
    assert settings.admin_token.get_secret_value() == SECRET


def test_arguments_beat_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONENET_OTA_PORT", "9000")
    assert Settings(port=9100).port == 9100


def test_secrets_stay_out_of_repr() -> None:
    settings = Settings(
        admin_token=SecretStr(SECRET), push_url="http://x/", push_token=SecretStr("push-secret")
    )
    assert SECRET not in repr(settings)
    assert "push-secret" not in repr(settings)
    assert SECRET not in str(settings.model_dump())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"public_address": "a-host-name-that-is-far-too-long.example:80"},  # > 31 (D10)
        {"public_address": "host:port"},
        {"port": 70000},
        {"workers": 0},
        {"admin_token": "short"},
        {"admin_token": "contains spaces in the token"},
        {"tls_cert": "cert.pem"},  # without its key
        {"max_upload_bytes": 2**31},  # §4.5: the C SDK reads size as an int
        {"max_upload_bytes": 0},
        {"push_url": "ftp://example/"},
        {"push_url": "http://example/"},  # without push_token
        {"idle_timeout": 0},
        {"cache_ttl": -1},
    ],
)
def test_invalid_settings_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Settings(**kwargs)  # type: ignore[arg-type]


def test_http_limits_come_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from onenet_ota.server.app import http_limits
    from onenet_ota.server.http import Limits

    assert http_limits(Settings()) == Limits()  # the layer's defaults, cap from RLIMIT_NOFILE
    monkeypatch.setenv("ONENET_OTA_MAX_CONNECTIONS", "300")
    monkeypatch.setenv("ONENET_OTA_BODY_TIMEOUT", "5")
    monkeypatch.setenv("ONENET_OTA_HEADER_TIMEOUT", "4")
    monkeypatch.setenv("ONENET_OTA_HANDSHAKE_TIMEOUT", "3")
    monkeypatch.setenv("ONENET_OTA_IDLE_TIMEOUT", "2")
    limits = http_limits(Settings())
    assert (limits.max_connections, limits.body_timeout, limits.header_timeout) == (300, 5.0, 4.0)
    assert (limits.handshake_timeout, limits.idle_timeout) == (3.0, 2.0)
    with pytest.raises(ValidationError, match="max_connections"):
        Settings(max_connections=0)
