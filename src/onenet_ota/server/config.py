"""Server settings: one value object, read from ``ONENET_OTA_*`` environment variables (and a
``.env`` file when asked) or given directly. Only the CLI and :mod:`onenet_ota.server.app` read the
environment; everything else receives a :class:`Settings`.

| Setting | Environment | Default |
|---|---|---|
| ``db`` | ``ONENET_OTA_DB`` | ``sqlite:///{data_dir}/onenet-ota.db`` |
| ``data_dir`` | ``ONENET_OTA_DATA_DIR`` | ``./data``; package files in ``{data_dir}/packages`` |
| ``host`` / ``port`` | ``ONENET_OTA_HOST`` / ``ONENET_OTA_PORT`` | ``127.0.0.1`` / ``8080`` |
| ``public_address`` | ``ONENET_OTA_PUBLIC_ADDRESS`` | none: cdn devices get no ``ipPort`` (D10) |
| ``admin_token`` | ``ONENET_OTA_ADMIN_TOKEN`` | the first admin token: generated, printed once |
| ``workers`` | ``ONENET_OTA_WORKERS`` | ``1`` (in-process) |
| ``tls_cert`` / ``tls_key`` | ``ONENET_OTA_TLS_CERT`` / ``ONENET_OTA_TLS_KEY`` | none: plain HTTP |
| ``max_upload_bytes`` | ``ONENET_OTA_MAX_UPLOAD_BYTES`` | 256 MiB (at most 2^31-1, §4.5) |
| ``idle_timeout`` | ``ONENET_OTA_IDLE_TIMEOUT`` | 15 s (D19) |
| ``header_timeout`` | ``ONENET_OTA_HEADER_TIMEOUT`` | 10 s for a whole request head |
| ``body_timeout`` | ``ONENET_OTA_BODY_TIMEOUT`` | 20 s for a body, plus its length at 500 B/s |
| ``handshake_timeout`` | ``ONENET_OTA_HANDSHAKE_TIMEOUT`` | 10 s for a TLS handshake |
| ``max_connections`` | ``ONENET_OTA_MAX_CONNECTIONS`` | from the descriptor limit (RLIMIT_NOFILE) |
| ``sweep_interval`` | ``ONENET_OTA_SWEEP_INTERVAL`` | 30 s between deadline sweeps (D23) |
| ``cache_ttl`` | ``ONENET_OTA_CACHE_TTL`` | 30 s: longest life of a device-API cache entry |
| ``push_url`` / ``push_token`` / ``push_uid`` | ``ONENET_OTA_PUSH_*`` | none: no task push (§11) |
| ``metrics`` | ``ONENET_OTA_METRICS`` | ``loopback`` (``/metrics``), or token, public, off |
| ``metrics_token`` | ``ONENET_OTA_METRICS_TOKEN`` | none; the bearer token of ``token`` |
| ``access_log`` | ``ONENET_OTA_ACCESS_LOG`` | off: one log record per request when on |
| ``log_format`` | ``ONENET_OTA_LOG_FORMAT`` | ``text``; ``json`` for one JSON object per line |
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from onenet_ota.protocol import values

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_MAX_UPLOAD_BYTES = 256 * 1024 * 1024
DB_FILE_NAME = "onenet-ota.db"


class Settings(BaseSettings):
    """Everything ``onenet-ota serve`` can be told. Immutable once built."""

    model_config = SettingsConfigDict(
        env_prefix="ONENET_OTA_",
        frozen=True,
        extra="ignore",
        validate_default=True,
    )

    db: str | None = Field(
        default=None,
        description="database URL: sqlite:///path or postgresql://user@host/db",
    )
    data_dir: Path = Field(default=Path("data"), description="where package files are stored")
    # Loopback unless told otherwise: a fresh install is not reachable from the network until
    # its operator decides so (--host 0.0.0.0), e.g. once a firewall admits the device networks.
    host: str = Field(default=DEFAULT_HOST, min_length=1, description="address to listen on")
    port: Annotated[int, Field(ge=0, le=65535)] = DEFAULT_PORT
    public_address: str | None = Field(
        default=None, description="host[:port] handed to cdn devices as ipPort (D10)"
    )
    admin_token: SecretStr | None = Field(
        default=None,
        description="secret of the admin API token created on the first start (an empty token"
        " table); generated and printed once when unset, ignored once tokens exist",
    )
    workers: Annotated[int, Field(ge=1, le=64)] = 1
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_upload_bytes: Annotated[int, Field(ge=1, le=values.PACKAGE_SIZE_MAX)] = (
        DEFAULT_MAX_UPLOAD_BYTES
    )
    idle_timeout: Annotated[float, Field(gt=0, le=3600)] = 15.0
    header_timeout: Annotated[float, Field(gt=0, le=3600)] = 10.0
    body_timeout: Annotated[float, Field(gt=0, le=3600)] = 20.0
    handshake_timeout: Annotated[float, Field(gt=0, le=3600)] = 10.0
    max_connections: Annotated[int | None, Field(ge=1)] = Field(
        default=None,
        description="connections per process at once; default: derived from the descriptor limit",
    )
    sweep_interval: Annotated[float, Field(gt=0, le=86400)] = 30.0
    # Changes made through any server process reach every cache within 0.1 s (server/changes.py);
    # this bounds only what the feed cannot carry (SQL typed into the database by hand).
    cache_ttl: Annotated[float, Field(ge=0, le=86400)] = 30.0  # device_service.DEFAULT_CACHE_TTL
    console: bool = Field(default=True, description="serve the web console at /console")
    console_session_hours: Annotated[float, Field(gt=0, le=24 * 30)] = 8.0
    push_url: str | None = Field(default=None, description="task-push receiver URL (§11)")
    push_token: SecretStr | None = Field(default=None, description="task-push token (§11)")
    push_uid: Annotated[int, Field(ge=0)] = 0
    # Who may read /metrics (server/ops_api.py). Loopback by default: the counts say how busy
    # the fleet is and which endpoints fail, nothing a device network needs to see.
    metrics: Literal["off", "loopback", "token", "public"] = "loopback"
    metrics_token: SecretStr | None = Field(
        default=None, description="bearer token for /metrics when metrics=token"
    )
    access_log: bool = False
    log_format: Literal["text", "json"] = "text"

    @field_validator("public_address")
    @classmethod
    def _check_public_address(cls, value: str | None) -> str | None:
        if value is not None and not values.is_ip_port(value):
            raise ValueError(
                "must be host or host:port, at most 31 characters (the C SDK's ipPort buffer)"
            )
        return value

    @field_validator("admin_token", "metrics_token")
    @classmethod
    def _check_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            token = value.get_secret_value()
            if len(token) < 16:
                raise ValueError("must be at least 16 characters")
            if not token.isascii() or not token.isprintable() or " " in token:
                raise ValueError("must be printable ASCII without spaces")
        return value

    @field_validator("push_url")
    @classmethod
    def _check_push_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @model_validator(mode="after")
    def _check_pairs(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.push_url is not None and self.push_token is None:
            raise ValueError("push_url needs push_token")
        if self.metrics == "token" and self.metrics_token is None:
            raise ValueError("metrics=token needs metrics_token")
        if self.metrics_token is not None and self.metrics != "token":
            raise ValueError("metrics_token is used only with metrics=token")
        return self

    @property
    def database_url(self) -> str:
        """``db``, or the default SQLite file inside ``data_dir``."""
        if self.db:
            return self.db
        return f"sqlite:///{self.data_dir.resolve() / DB_FILE_NAME}"

    @property
    def packages_dir(self) -> Path:
        """Where the blob store keeps package files."""
        return self.data_dir.resolve() / "packages"

    @property
    def tls(self) -> bool:
        """Whether the listener speaks TLS."""
        return self.tls_cert is not None
