"""``onenet-ota admin token`` and ``onenet-ota admin audit``: the management API's named tokens
and its audit log (both over ``/api/v1``, with the same ``--server``/``--admin-token``/``--json``
options as every ``admin`` command).

Examples::

    onenet-ota admin token create ci-deploy --role operator   # prints the secret, once
    onenet-ota admin token list
    onenet-ota admin token revoke 3                           # refused everywhere at once
    onenet-ota admin audit --actor ci-deploy --since 2026-12-01
"""

from __future__ import annotations

import json
from typing import Any, get_args

import click

from onenet_ota.cli.admin import (
    _common,
    _ctx,
    _print_object,
    _print_page,
    _print_table,
    _timestamp,
)
from onenet_ota.management.models import Role

__all__ = ["audit", "token"]

_TOKEN_COLUMNS = ["id", "name", "role", "prefix", "created_at", "last_used_at", "revoked_at"]
_ROLES = get_args(Role)


@click.group()
def token() -> None:
    """API tokens of the management API: named, each with a role (viewer < operator < admin).
    Managing them needs an admin token."""


@token.command("create")
@click.argument("name")
@click.option(
    "--role",
    type=click.Choice(_ROLES),
    default="viewer",
    show_default=True,
    help="viewer: read; operator: also change; admin: also manage tokens",
)
@_common
def token_create(
    name: str, role: Role, server: str, admin_token: str | None, as_json: bool
) -> None:
    """Create token NAME (unique, never reused); prints its secret, shown this once only."""
    ctx = _ctx(server, admin_token, as_json)
    created = ctx.run(lambda api: api.create_token(name, role=role))

    def human(t: dict[str, Any]) -> None:
        _print_object(t, skip=("secret",))
        click.echo("")
        click.echo("secret (shown only now; store it safely):")
        click.echo(t["secret"])

    ctx.show(created, human)


@token.command("list")
@click.option("--limit", type=click.IntRange(1, 1000))
@click.option("--after", metavar="CURSOR", help="continue after this page cursor")
@_common
def token_list(
    limit: int | None, after: str | None, server: str, admin_token: str | None, as_json: bool
) -> None:
    """List tokens, revoked ones included (never their secrets)."""
    ctx = _ctx(server, admin_token, as_json)
    page = ctx.run(lambda api: api.list_tokens(limit=limit, after=after))
    ctx.show(page, lambda p: _print_page(p, _TOKEN_COLUMNS))


@token.command("revoke")
@click.argument("token_id", type=click.IntRange(1))
@_common
def token_revoke(token_id: int, server: str, admin_token: str | None, as_json: bool) -> None:
    """Revoke token TOKEN_ID: every request with it fails from now on."""
    ctx = _ctx(server, admin_token, as_json)
    ctx.run(lambda api: api.revoke_token(token_id))
    ctx.show({"revoked": token_id}, lambda _: click.echo(f"token {token_id} revoked"))


def _change(entry: dict[str, Any]) -> str:
    """``before -> after`` of the fields that changed, in one line."""
    before = entry.get("before") or {}
    after = entry.get("after") or {}
    if not before or not after:
        return json.dumps(after or before, separators=(",", ":"), ensure_ascii=False)[:200]
    changed = [k for k in {**before, **after} if before.get(k) != after.get(k)]
    return ", ".join(f"{k}: {before.get(k)} -> {after.get(k)}" for k in changed)[:200]


@click.command("audit")
@click.option("--actor", help="only this token name or system:<component>")
@click.option("--action", help="only this action, e.g. product.create or task.pause")
@click.option("--target", help="only this object, e.g. product:123123 or task:7")
@click.option("--since", help="only entries at or after this time (Unix seconds or ISO 8601)")
@click.option("--until", help="only entries at or before this time (Unix seconds or ISO 8601)")
@click.option("--limit", type=click.IntRange(1, 1000))
@click.option("--after", metavar="CURSOR", help="continue after this page cursor")
@_common
def audit(
    actor: str | None, action: str | None, target: str | None, since: str | None,
    until: str | None, limit: int | None, after: str | None, server: str,
    admin_token: str | None, as_json: bool,
) -> None:  # fmt: skip
    """Show the audit log, oldest first: who changed what, when, and from what to what."""
    ctx = _ctx(server, admin_token, as_json)
    start, end = _timestamp(since, "--since"), _timestamp(until, "--until")
    page = ctx.run(
        lambda api: api.list_audit(
            actor=actor, action=action, target=target, since=start, until=end, limit=limit,
            after=after,
        )
    )  # fmt: skip

    def human(p: dict[str, Any]) -> None:
        rows = [{**e, "logged_at": e["at"], "change": _change(e)} for e in p.get("items", [])]
        _print_table(rows, ["id", "logged_at", "actor", "action", "target", "change", "detail"])
        if p.get("next"):
            click.echo(f"(more: --after {p['next']})")

    ctx.show(page, human)
