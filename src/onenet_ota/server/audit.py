"""The audit log: who changed what, when, from what to what, and why.

Every management action (accounts, products, devices, packages, tasks, API tokens) and every
automatic decision calls :func:`record` with the connection of its own transaction, so the row
commits with the change and a change that is rolled back leaves no row. ``actor`` is the name of
the API token that asked (:func:`current_actor`, set by the management API for the request) or
``system:<component>`` for an automatic decision, whose ``detail`` then holds the numbers behind
it (e.g. ``paused: 7/40 = 17.5 % > 10 % after 20 executed``).

``before`` and ``after`` are JSON objects with every secret redacted (:func:`redact`): keys,
token secrets and their hashes never reach the log.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import time
from collections.abc import Iterator, Mapping
from typing import Any, Final

from sqlalchemy import Connection, Engine, insert, select

from onenet_ota.management.models import AuditEntry, AuditPage
from onenet_ota.server.schema import audit_log

__all__ = [
    "REDACTED",
    "AuditEntry",
    "AuditPage",
    "acting_as",
    "current_actor",
    "list_entries",
    "record",
    "redact",
]

REDACTED: Final = "(redacted)"
"""What a secret's value becomes in ``before`` and ``after`` (None stays None: "no key")."""

# Field names whose values are secrets: access and device keys, download tokens, API token
# secrets and hashes, passwords. Matched as parts of the name (``access_key``, ``secret_hash``).
_SECRET_WORDS: Final = ("key", "secret", "token", "password", "hash")
DIRECT_ACTOR: Final = "system:direct"
"""The actor of changes made by calling the services directly, outside any API request."""
_ACTOR: Final[contextvars.ContextVar[str]] = contextvars.ContextVar(
    "onenet_ota_audit_actor", default=DIRECT_ACTOR
)
MAX_DETAIL: Final = 4000  # characters of ``detail`` kept


def current_actor() -> str:
    """Who the current management call acts for (the API sets it per request)."""
    return _ACTOR.get()


@contextlib.contextmanager
def acting_as(actor: str) -> Iterator[None]:
    """Make ``actor`` the :func:`current_actor` inside the block. Threads started with the
    context copied (``asyncio.to_thread`` does) inherit it."""
    reset = _ACTOR.set(actor)
    try:
        yield
    finally:
        _ACTOR.reset(reset)


def _is_secret(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in _SECRET_WORDS)


def redact(value: Any) -> Any:
    """``value`` (a JSON-like structure) with the value of every secret-named field replaced by
    :data:`REDACTED`, at any depth."""
    if isinstance(value, Mapping):
        return {
            str(k): (REDACTED if v is not None and _is_secret(str(k)) else redact(v))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(item) for item in value]
    return value


def _encode(state: Mapping[str, Any] | None) -> str | None:
    if state is None:
        return None
    return json.dumps(redact(state), separators=(",", ":"), ensure_ascii=False, default=str)


def record(
    conn: Connection,
    *,
    actor: str,
    action: str,
    target: str,
    before: Mapping[str, Any] | None,
    after: Mapping[str, Any] | None,
    detail: str | None = None,
    now: float | None = None,
) -> None:
    """Add one audit row inside the caller's transaction (``conn``).

    ``action`` is ``<object>.<verb>`` (``product.create``, ``task.pause``), ``target`` names the
    object (``product:123123``, ``task:7``), ``before``/``after`` its state around the change
    (None: it did not exist / no longer exists); secrets in them are redacted here.
    """
    conn.execute(
        insert(audit_log).values(
            created_at=int(time.time() if now is None else now),
            actor=actor[:80],
            action=action[:64],
            target=target[:200],
            before_state=_encode(before),
            after_state=_encode(after),
            detail=None if detail is None else detail[:MAX_DETAIL],
        )
    )


def list_entries(
    engine: Engine,
    *,
    actor: str | None = None,
    action: str | None = None,
    target: str | None = None,
    since: int | None = None,
    until: int | None = None,
    after: int | None = None,
    limit: int = 100,
) -> AuditPage:
    """Audit rows in id order (the order they committed in on SQLite; on PostgreSQL, the order
    their ids were drawn), filtered; ``since``/``until`` bound ``at`` inclusively."""
    c = audit_log.c
    query = select(audit_log)
    for column, value in ((c.actor, actor), (c.action, action), (c.target, target)):
        if value is not None:
            query = query.where(column == value)
    if since is not None:
        query = query.where(c.created_at >= since)
    if until is not None:
        query = query.where(c.created_at <= until)
    if after is not None:
        query = query.where(c.id > after)
    query = query.order_by(c.id).limit(limit + 1)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    items = [
        AuditEntry(
            id=r.id,
            at=r.created_at,
            actor=r.actor,
            action=r.action,
            target=r.target,
            before=None if r.before_state is None else json.loads(r.before_state),
            after=None if r.after_state is None else json.loads(r.after_state),
            detail=r.detail,
        )
        for r in rows[:limit]
    ]
    return AuditPage(items=items, next=str(items[-1].id) if len(rows) > limit else None)
