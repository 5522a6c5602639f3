"""Who may sign in to the console: the platform's named API tokens (:mod:`..api_tokens`).

:class:`TokenDirectory` is what the console needs from the token store: check a presented
secret, and tell whether a token that signed in earlier is still active. The console asks the
second on every request, so a revocation ends every session at once, on every worker.
"""

from __future__ import annotations

from typing import Protocol

from onenet_ota.server.api_tokens import Principal

__all__ = ["TokenDirectory"]


class TokenDirectory(Protocol):
    """The console's view of the platform's API tokens (:class:`~..api_tokens.TokenStore`)."""

    def verify(self, secret: str, *, touch: bool = True) -> Principal | None:
        """The active token whose secret is ``secret``, or None (compared in constant time)."""

    def active(self, token_id: int) -> Principal | None:
        """Token ``token_id`` as it is now, or None once it is revoked."""
