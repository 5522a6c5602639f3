"""Named bearer tokens of the management API, each with a role: viewer, operator or admin.

A token's secret is ``oota_`` and 43 random URL-safe characters (256 bits): the prefix makes a
leaked token recognisable to a secret scanner and to a person. The server keeps only a keyed
hash of it (:func:`hash_secret`), its first characters for lists (``prefix``), a unique name, the
role, and the times it was created, last used (to the minute) and revoked. The secret is shown
once, when the token is created.

Roles are ordered: an admin may do what an operator may, an operator what a viewer may. Viewers
read; operators change accounts, products, devices, packages and tasks; admins also manage
tokens (the management API's route table says which route needs which role).

Every request looks its token up in the database: there is no cache of verified tokens, so a
revocation is refused by every worker process and every host on the same database from the
commit on, with nothing to propagate (the management API is not a hot path: one indexed read
next to the request's own work). ``last_used_at`` is written at most once a minute per token and
process, off the request's path, never once per request.

The first start of a server on an empty token table creates a token named ``admin`` with the
admin role (:meth:`TokenStore.bootstrap`): with the secret the operator configured
(``ONENET_OTA_ADMIN_TOKEN``), or a generated one that ``serve`` prints once. A token row is
never deleted (revoked ones stay, ``revoked_at`` set), so the table never becomes empty again
and nothing is regenerated at a restart; ids and names are never reused.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import Engine, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from onenet_ota.management.models import (
    ApiToken,
    ApiTokenCreate,
    ApiTokenCreated,
    Role,
)
from onenet_ota.server import audit
from onenet_ota.server.admin_service import Conflict, NotFound, Page, column_max
from onenet_ota.server.schema import api_tokens

__all__ = [
    "ROLES",
    "ApiToken",
    "ApiTokenCreate",
    "ApiTokenCreated",
    "Principal",
    "Role",
    "TokenStore",
    "hash_secret",
    "new_secret",
    "role_allows",
]

log = logging.getLogger(__name__)

ROLES: Final[tuple[Role, ...]] = ("viewer", "operator", "admin")
_RANK: Final[dict[str, int]] = {role: rank for rank, role in enumerate(ROLES)}
SECRET_PREFIX: Final = "oota_"
_SHOWN: Final = len(SECRET_PREFIX) + 6  # characters of a generated secret kept for lists
BOOTSTRAP_NAME: Final = "admin"
TOKEN_ID_MAX: Final = column_max(api_tokens.c.id)
_LAST_USED_EVERY: Final = 60  # seconds between two writes of a token's last_used_at

# The hash: HMAC-SHA256 under a fixed key. A slow password hash (bcrypt, scrypt, Argon2) exists
# to make guessing a low-entropy password from its hash expensive; a generated secret has 256
# random bits, which no number of fast guesses exhausts, so a slow hash would only make every
# request pay milliseconds of CPU (and let a flood of bad tokens burn it). The fixed key
# separates these digests from any other SHA-256 of the same bytes. The database lookup is by
# the digest, so its timing depends on the digest of what the client sent, which says nothing
# about any stored secret; the digest found is compared again in constant time. A secret the
# operator chose for the first start (ONENET_OTA_ADMIN_TOKEN) should be as random (docs/deploy.md).
_HASH_KEY: Final = b"onenet-ota management API token v1"


def hash_secret(secret: str) -> str:
    """The stored form of ``secret``: hex HMAC-SHA256 under this module's fixed key."""
    data = secret.encode("utf-8", "surrogateescape")
    return hmac.new(_HASH_KEY, data, hashlib.sha256).hexdigest()


def new_secret() -> str:
    """A new token secret: ``oota_`` and 43 URL-safe characters (32 random bytes)."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def _shown_prefix(secret: str) -> str:
    # Only a generated secret's first characters are kept (6 random ones: too few to help a
    # guess). Nothing of an operator-chosen secret is stored: it may be a guessable phrase.
    if secret.startswith(SECRET_PREFIX) and len(secret) >= 40:
        return secret[:_SHOWN]
    return ""


def role_allows(role: str, needed: str) -> bool:
    """Whether ``role`` may do what ``needed`` may (admin > operator > viewer)."""
    return _RANK.get(role, -1) >= _RANK[needed]


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request acts for: a token's id, name and role."""

    id: int
    name: str
    role: Role


def _public(row: Any) -> ApiToken:
    return ApiToken(
        id=row.id,
        name=row.name,
        role=row.role,
        prefix=row.prefix,
        created_at=row.created_at,
        last_used_at=row.last_used_at,
        revoked_at=row.revoked_at,
    )


def _state(token: ApiToken) -> dict[str, Any]:
    """A token's state for the audit log."""
    return token.model_dump(exclude={"last_used_at"})


class TokenStore:
    """The ``api_tokens`` table: create, list, revoke, verify, and the first start's token."""

    def __init__(self, engine: Engine, *, clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self._clock = clock
        self._touching: set[int] = set()  # tokens whose last_used_at a thread is writing
        self._lock = threading.Lock()

    def _now(self) -> int:
        return int(self._clock())

    def create(
        self, spec: ApiTokenCreate, *, secret: str | None = None, actor: str | None = None
    ) -> ApiTokenCreated:
        """Create a token (409 if the name was ever used); returns it with its secret."""
        secret = secret or new_secret()
        now = self._now()
        try:
            with self.engine.begin() as conn:
                taken = conn.execute(
                    select(api_tokens.c.id).where(api_tokens.c.name == spec.name)
                ).first()
                if taken is not None:
                    raise Conflict(
                        f"a token named {spec.name} exists or existed; names are never reused"
                    )
                token_id = conn.execute(
                    insert(api_tokens)
                    .values(
                        name=spec.name,
                        role=spec.role,
                        prefix=_shown_prefix(secret),
                        secret_hash=hash_secret(secret),
                        created_at=now,
                    )
                    .returning(api_tokens.c.id)
                ).scalar_one()
                row = conn.execute(select(api_tokens).where(api_tokens.c.id == token_id)).one()
                token = _public(row)
                audit.record(
                    conn, actor=actor or audit.current_actor(), action="token.create",
                    target=f"token:{token_id}", before=None, after=_state(token), now=now,
                )  # fmt: skip
        except IntegrityError:
            # The same name (or, astronomically unlikely, secret) committed meanwhile.
            raise Conflict(f"a token named {spec.name} exists or existed") from None
        return ApiTokenCreated(**token.model_dump(), secret=secret)

    def list(self, *, limit: int = 100, after: int | None = None) -> Page[ApiToken]:
        """Tokens in id order, revoked ones included."""
        query = select(api_tokens)
        if after is not None:
            query = query.where(api_tokens.c.id > after)
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(api_tokens.c.id).limit(limit + 1)).all()
        items = [_public(r) for r in rows[:limit]]
        return Page(items, str(items[-1].id) if len(rows) > limit else None)

    def revoke(self, token_id: int) -> ApiToken:
        """Revoke a token: from the commit on, no request with it succeeds, on any process.

        Revoking a revoked token changes nothing (a repeated request after a lost reply). The
        last active admin token cannot be revoked (409): nobody could manage tokens any more.
        """
        now = self._now()
        with self.engine.begin() as conn:
            # The active admins are locked first (PostgreSQL), so two concurrent revocations of
            # the last two cannot both see the other one still active.
            admins = (
                conn.execute(
                    select(api_tokens.c.id)
                    .where(api_tokens.c.role == "admin", api_tokens.c.revoked_at.is_(None))
                    .order_by(api_tokens.c.id)
                    .with_for_update()
                )
                .scalars()
                .all()
            )
            row = conn.execute(select(api_tokens).where(api_tokens.c.id == token_id)).first()
            if row is None:
                raise NotFound(f"token {token_id} not found")
            before = _public(row)
            if row.revoked_at is not None:
                return before
            if admins == [token_id]:
                raise Conflict(
                    f"token {token_id} ({row.name}) is the last active admin token; create"
                    " another admin token first"
                )
            conn.execute(
                update(api_tokens).where(api_tokens.c.id == token_id).values(revoked_at=now)
            )
            after = before.model_copy(update={"revoked_at": now})
            audit.record(
                conn, actor=audit.current_actor(), action="token.revoke",
                target=f"token:{token_id}", before=_state(before), after=_state(after), now=now,
            )  # fmt: skip
        return after

    def verify(self, secret: str, *, touch: bool = True) -> Principal | None:
        """The active token whose secret is ``secret``, or None. Reads the database every time
        (see the module docstring: a revocation counts from its commit). ``touch``: note the
        use in ``last_used_at`` (at most once a minute)."""
        digest = hash_secret(secret)
        query = select(
            api_tokens.c.id,
            api_tokens.c.name,
            api_tokens.c.role,
            api_tokens.c.secret_hash,
            api_tokens.c.last_used_at,
        ).where(api_tokens.c.secret_hash == digest, api_tokens.c.revoked_at.is_(None))
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        if row is None or not hmac.compare_digest(row.secret_hash, digest):
            return None
        now = self._now()
        if touch and (row.last_used_at is None or now - row.last_used_at >= _LAST_USED_EVERY):
            self._touch(row.id, now)
        return Principal(id=row.id, name=row.name, role=row.role)

    def active(self, token_id: int) -> Principal | None:
        """Token ``token_id`` if it is still active (not revoked), else None. Reads the
        database every time, like :meth:`verify`: the web console asks it on every request, so
        a revocation ends a console session at once."""
        query = select(api_tokens.c.id, api_tokens.c.name, api_tokens.c.role).where(
            api_tokens.c.id == token_id, api_tokens.c.revoked_at.is_(None)
        )
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return None if row is None else Principal(id=row.id, name=row.name, role=row.role)

    def _touch(self, token_id: int, now: int) -> None:
        with self._lock:
            if token_id in self._touching:
                return
            self._touching.add(token_id)

        def write() -> None:
            try:
                with self.engine.begin() as conn:
                    conn.execute(
                        update(api_tokens)
                        .where(api_tokens.c.id == token_id)
                        .values(last_used_at=now)
                    )
            except Exception:  # a hint for operators only; the next use tries again
                log.warning("cannot record the last use of API token %d", token_id, exc_info=True)
            finally:
                with self._lock:
                    self._touching.discard(token_id)

        # Off the request's path: on SQLite a write waits for the database's write lock.
        threading.Thread(target=write, name="onenet-ota-token-used", daemon=True).start()

    def count(self) -> int:
        """How many tokens were ever created (revoked ones included)."""
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(api_tokens)).scalar_one())

    def bootstrap(self, secret: str | None = None) -> str | None:
        """On an empty token table, create the admin token named ``admin``: with ``secret``, or
        a generated one, which is returned (the caller shows it once). Returns None when the
        table had tokens (nothing is created, whatever ``secret`` is) or ``secret`` was given.

        Safe when several processes start at once: one creates the token, the others find it.
        """
        if self.count():
            return None
        chosen = secret or new_secret()
        try:
            # A concurrent first start that got there first has taken the name: Conflict.
            self.create(
                ApiTokenCreate(name=BOOTSTRAP_NAME, role="admin"),
                secret=chosen,
                actor="system:first-start",
            )
        except Conflict:
            return None
        return None if secret else chosen
