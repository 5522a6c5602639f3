"""Who may sign in to the console, and with which role.

The console signs operators in with a management-API token. :class:`TokenDirectory` is what
the console needs from the platform's token store: check a presented secret, and tell whether a
token that signed in earlier is still valid (asked on every request, so a revocation ends every
session at once, on every worker).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Final, Protocol

__all__ = ["ROLES", "AdminTokenDirectory", "Principal", "TokenDirectory", "role_allows"]

ROLES: Final = ("viewer", "operator", "admin")
"""The roles, weakest first: each may do everything the ones before it may."""


def role_allows(role: str, needed: str) -> bool:
    """Whether ``role`` may do what needs ``needed``; an unknown role may do nothing."""
    if role not in ROLES or needed not in ROLES:
        return False
    return ROLES.index(role) >= ROLES.index(needed)


@dataclass(frozen=True, slots=True)
class Principal:
    """A token's identity: its id, its name (what the audit log shows) and its role."""

    token_id: str
    name: str
    role: str


class TokenDirectory(Protocol):
    """The console's view of the platform's API tokens."""

    def authenticate(self, secret: str) -> Principal | None:
        """The token whose secret is ``secret``, or None (compared in constant time)."""

    def is_active(self, principal: Principal) -> bool:
        """Whether ``principal``'s token still exists, unrevoked, with the same role."""


class AdminTokenDirectory:
    """The single admin token of the settings, as a directory of one admin."""

    def __init__(self, admin_token: str) -> None:
        self._digest = hashlib.sha256(admin_token.encode()).digest()
        self._principal = Principal("admin", "admin", "admin")

    def authenticate(self, secret: str) -> Principal | None:
        given = hashlib.sha256(secret.encode("utf-8", "replace")).digest()
        return self._principal if hmac.compare_digest(given, self._digest) else None

    def is_active(self, principal: Principal) -> bool:
        return principal == self._principal
