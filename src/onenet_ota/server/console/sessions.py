"""The console's sign-in sessions: a signed cookie, and the CSRF token that goes with it.

A session is a cookie holding who signed in (the API token's id, name and role), when it
expires, and a random nonce, signed with HMAC-SHA256 under a key kept in the data directory.
Every worker process reads the same key file, so a session made by one worker is honoured by
all, and nothing about sessions is kept in memory: no store grows with sign-ins. The cookie
never holds the API token itself; each request also checks that the token is still valid, so a
revoked token ends its sessions at once (see :class:`~onenet_ota.server.console.app.Console`).

The CSRF token is derived from the session (HMAC of its nonce under the same key), so it needs
no storage either, and a form copied from one session is refused in another.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["KEY_FILE_NAME", "Session", "SessionCodec", "load_or_create_key"]

KEY_FILE_NAME = "console-session.key"
"""The session key's file in the data directory (32 random bytes, mode 0600)."""

_KEY_BYTES = 32
_MAX_COOKIE = 1024  # a cookie longer than any session this module writes is refused unread


def load_or_create_key(data_dir: Path) -> bytes:
    """The session key from ``data_dir``, made once on first use.

    Creation is exclusive (``O_EXCL``) and the file is written whole before it is linked, so
    workers starting together agree on one key and none ever reads half a key.
    """
    path = data_dir / KEY_FILE_NAME
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        data_dir.mkdir(parents=True, exist_ok=True)
        fresh = secrets.token_bytes(_KEY_BYTES)
        tmp = data_dir / f".{KEY_FILE_NAME}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, fresh)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # fails if another worker linked its key first: use that one
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        key = path.read_bytes()
    if len(key) != _KEY_BYTES:
        raise ValueError(f"{path} must hold {_KEY_BYTES} bytes; remove it to make a new key")
    return key


@dataclass(frozen=True, slots=True)
class Session:
    """A signed-in operator: the API token that signed in, and the session's expiry."""

    token_id: str
    name: str
    role: str
    expires: int  # Unix seconds
    nonce: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class SessionCodec:
    """Makes and reads session cookies and CSRF tokens under one key."""

    def __init__(
        self, key: bytes, *, lifetime: float = 8 * 3600, clock: Callable[[], float] = time.time
    ) -> None:
        if len(key) < 16:
            raise ValueError("the session key is too short")
        self._key = key
        self.lifetime = lifetime
        self._clock = clock

    def _mac(self, purpose: bytes, data: bytes) -> bytes:
        return hmac.new(self._key, purpose + b"\0" + data, hashlib.sha256).digest()

    def new(self, token_id: str, name: str, role: str) -> Session:
        """A fresh session for the token that just signed in."""
        return Session(
            token_id=token_id,
            name=name,
            role=role,
            expires=int(self._clock() + self.lifetime),
            nonce=secrets.token_urlsafe(16),
        )

    def encode(self, session: Session) -> str:
        """The cookie value of ``session``."""
        payload = json.dumps(
            [session.token_id, session.name, session.role, session.expires, session.nonce],
            separators=(",", ":"),
        ).encode()
        return f"{_b64(payload)}.{_b64(self._mac(b'session', payload))}"

    def decode(self, value: str | None) -> Session | None:
        """The session in cookie ``value``, or None if it is missing, forged or expired.

        The signature is compared in constant time, and checked before the payload is parsed,
        so nothing a client invents is ever decoded.
        """
        if not value or len(value) > _MAX_COOKIE or value.count(".") != 1:
            return None
        body, _, mac = value.partition(".")
        try:
            payload = _unb64(body)
            given = _unb64(mac)
        except ValueError:
            return None
        if not hmac.compare_digest(given, self._mac(b"session", payload)):
            return None
        try:
            token_id, name, role, expires, nonce = json.loads(payload)
        except (ValueError, TypeError):
            return None
        if type(expires) is not int or not self._clock() < expires:
            return None
        return Session(str(token_id), str(name), str(role), expires, str(nonce))

    def csrf_token(self, session: Session) -> str:
        """The CSRF token every form and htmx request of ``session`` must carry."""
        return _b64(self._mac(b"csrf", session.nonce.encode()))

    def check_csrf(self, session: Session, given: str | None) -> bool:
        """Whether ``given`` is ``session``'s CSRF token (constant time)."""
        if not given:
            return False
        return hmac.compare_digest(given.encode(), self.csrf_token(session).encode())
