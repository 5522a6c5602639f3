"""``onenet-ota admin``: the operator's command line over the management API (``/api/v1``).

Every command takes ``--server`` (env ``ONENET_OTA_SERVER``, default ``http://127.0.0.1:8080``),
``--admin-token`` (env ``ONENET_OTA_ADMIN_TOKEN``) and ``--json`` (print the API's JSON instead of
the human summary). Errors print one clear line on stderr and exit with code 1.

Examples::

    onenet-ota admin product create --id 123123 --access-key "$KEY"   # take over a OneNET product
    onenet-ota admin account create --uid 4242 --access-key "$USER_KEY" # its OneNET user (fuse)
    onenet-ota admin product set-account 123123 4242                   # userid tokens now work
    onenet-ota admin device add --pid 123123 --name dev01 --dev-id 987654321
    onenet-ota admin device import --pid 123123 devices.csv           # name,dev_id,device_key,...
    onenet-ota admin package upload fw.bin --pid 123123 --type fota --target 1.0.1
    onenet-ota admin task create --package 1 --from-version 1.0.0 --deadline 2030-01-01T00:00Z
    onenet-ota admin task show 1
    onenet-ota admin device delete 987654321                          # no open task left
    onenet-ota admin task delete 1                                    # cancelled or finished
    onenet-ota admin device label 987654321 region=eu ring=canary
    onenet-ota admin campaign create --package 1 --label region=eu \
        --stage count=100,min_executed=20,max_failed_percent=10 --stage percent=50 --stage rest
    onenet-ota admin campaign create --package 1 --from-version 1.0 --dynamic \
        --rate per_minute=10,growth=2,period_s=600,max_per_minute=200 --stage percent=5 --stage rest
    onenet-ota admin campaign start 1
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, NoReturn, TypeVar, cast, get_args

import click
from pydantic import BaseModel

from onenet_ota.management import ManagementClient, ManagementError
from onenet_ota.management._core import Action, CampaignAction, CampaignState, FailureClassName
from onenet_ota.protocol.status import describe_status

DEFAULT_SERVER = "http://127.0.0.1:8080"

F = TypeVar("F", bound=Callable[..., Any])
R = TypeVar("R")


# --------------------------------------------------------------------------------------------
# Output


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def _human_time(value: Any) -> str:
    if not isinstance(value, int):
        return "-" if value is None else str(value)
    return datetime.fromtimestamp(value, tz=UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key.endswith(("_at", "_time")) or key == "deadline":
        return _human_time(value)
    if key == "result_code" and type(value) is int:
        return describe_status(value)  # e.g. "205 md5 mismatch (upgrade failed: MD5 check failed)"
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items() if v)
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "-"
    return str(value)


def _print_object(obj: dict[str, Any], *, skip: tuple[str, ...] = ()) -> None:
    keys = [k for k in obj if k not in skip and not isinstance(obj[k], list | dict)]
    width = max((len(k) for k in keys), default=0)
    for key in keys:
        click.echo(f"{key.ljust(width)}  {_cell(key, obj[key])}")
    for key, value in obj.items():
        if key in skip:
            continue
        if isinstance(value, dict):
            click.echo(f"{key.ljust(width)}  {_cell(key, value) or '-'}")


def _print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    if not rows:
        click.echo("(none)")
        return
    cells = [[_cell(c, row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    header = "  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))
    click.echo(header.rstrip())
    for r in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def _print_page(page: dict[str, Any], columns: list[str]) -> None:
    _print_table(page.get("items", []), columns)
    if page.get("next"):
        click.echo(f"(more: --after {page['next']})")


class _Ctx:
    """One command's client: :meth:`run` makes a typed call and prints a failure."""

    def __init__(self, server: str, token: str | None, as_json: bool) -> None:
        self.client = ManagementClient(server, token)
        self.as_json = as_json

    def run(self, operation: Callable[[ManagementClient], R]) -> R:
        """``operation(client)``; a failure is printed as one line (exit code 1)."""
        try:
            return operation(self.client)
        except ManagementError as exc:
            _fail(_describe(exc))
        finally:
            self.client.close()

    def show(self, payload: Any, human: Callable[[Any], None]) -> None:
        """Print ``payload`` (a model, or the API's JSON) as JSON or for humans."""
        plain = _plain(payload)
        if self.as_json:
            click.echo(json.dumps(plain, indent=2, ensure_ascii=False))
        else:
            human(plain)


def _plain(payload: Any) -> Any:
    """A reply model as the JSON the server sent (the printers read dicts)."""
    if isinstance(payload, BaseModel):
        return payload.model_dump(mode="json")
    if isinstance(payload, list):
        return [_plain(item) for item in payload]
    return payload


def _describe(exc: ManagementError) -> str:
    if exc.status == 401:
        return f"{exc} (give --admin-token or set ONENET_OTA_ADMIN_TOKEN)"
    if exc.status is not None:
        return f"{exc} (HTTP {exc.status})"
    return str(exc)


def _common(command: F) -> F:
    """--server, --admin-token and --json on every command."""
    command = click.option("--json", "as_json", is_flag=True, help="print the API's JSON reply")(
        command
    )
    command = click.option(
        "--admin-token",
        envvar="ONENET_OTA_ADMIN_TOKEN",
        metavar="TOKEN",
        help="management token [env ONENET_OTA_ADMIN_TOKEN]",
    )(command)
    command = click.option(
        "--server",
        envvar="ONENET_OTA_SERVER",
        default=DEFAULT_SERVER,
        show_default=True,
        metavar="URL",
        help="server base URL [env ONENET_OTA_SERVER]",
    )(command)
    return command


def _ctx(server: str, admin_token: str | None, as_json: bool) -> _Ctx:
    if not server.startswith(("http://", "https://")):
        _fail(f"--server must be an http:// or https:// URL, not {server!r}")
    return _Ctx(server, admin_token, as_json)


def _timestamp(value: str | None, name: str) -> int | None:
    """Unix seconds, or an ISO 8601 date/time (UTC unless it names a zone)."""
    if value is None:
        return None
    if value.isdigit():
        return int(value)
    text = value.strip().replace("Z", "+00:00").replace("z", "+00:00")
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        _fail(f"{name}: {value!r} is neither Unix seconds nor an ISO 8601 date/time")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())


# --------------------------------------------------------------------------------------------
# Commands


@click.group()
def admin() -> None:
    """Manage accounts, products, devices, packages, upgrade tasks and campaigns on an onenet-ota
    server."""


def _delete(
    ctx: _Ctx, delete: Callable[[ManagementClient], None], what: str, ident: object
) -> None:
    """Run ``delete``; on success say which ``what`` went (``--json``: {"deleted": ident})."""
    ctx.run(delete)
    ctx.show({"deleted": ident}, lambda _: click.echo(f"{what} {ident} deleted"))


@dataclass(frozen=True)
class _KeyHolder:
    """What the commands of products and accounts need to know of their kind: both are an id
    and an access key, given or generated, so their commands differ only in names, help texts,
    columns and the client methods they call."""

    noun: str  # "product"
    article: str  # "a product"
    id_option: str  # the create option giving the id
    id_help: str
    id_metavar: str  # "PID"
    columns: list[str]
    rotate_help: str
    show_help: str
    delete_help: str
    create: Callable[[ManagementClient, str | None, str | None, str], BaseModel]
    rotate: Callable[[ManagementClient, str, str | None], BaseModel]
    page: Callable[[ManagementClient, int | None, str | None], BaseModel]
    get: Callable[[ManagementClient, str], BaseModel]
    reveal: Callable[[ManagementClient, str], BaseModel]
    delete: Callable[[ManagementClient, str], None]


def _key_holder_commands(group: click.Group, kind: _KeyHolder) -> None:
    """``create``, ``rotate-key``, ``list``, ``show`` and ``delete`` of ``kind`` in ``group``."""
    ident_arg = click.argument("ident", metavar=kind.id_metavar)

    @group.command(
        "create",
        help=f"Create {kind.article}; prints its {kind.id_metavar.lower()} and access key.",
    )
    @click.option(kind.id_option, "ident", metavar=kind.id_metavar, help=kind.id_help)
    @click.option("--access-key", metavar="KEY", help="access key to use (base64); else generated")
    @click.option("--name", default="", help="a label")
    @_common
    def create_command(
        ident: str | None, access_key: str | None, name: str, server: str,
        admin_token: str | None, as_json: bool,
    ) -> None:  # fmt: skip
        ctx = _ctx(server, admin_token, as_json)
        ctx.show(ctx.run(lambda api: kind.create(api, ident, access_key, name)), _print_object)

    @group.command("rotate-key", help=kind.rotate_help)
    @ident_arg
    @click.option("--access-key", metavar="KEY", help="the new key (base64); else generated")
    @_common
    def rotate_command(
        ident: str, access_key: str | None, server: str, admin_token: str | None, as_json: bool
    ) -> None:
        ctx = _ctx(server, admin_token, as_json)
        key = access_key or None
        ctx.show(ctx.run(lambda api: kind.rotate(api, ident, key)), _print_object)

    @group.command("list", help=f"List {kind.noun}s.")
    @click.option("--limit", type=click.IntRange(1, 1000))
    @click.option("--after", metavar="CURSOR", help="continue after this page cursor")
    @_common
    def list_command(
        limit: int | None, after: str | None, server: str, admin_token: str | None, as_json: bool
    ) -> None:
        ctx = _ctx(server, admin_token, as_json)
        page = ctx.run(lambda api: kind.page(api, limit, after))
        ctx.show(page, lambda p: _print_page(p, kind.columns))

    @group.command("show", help=kind.show_help)
    @ident_arg
    @click.option(
        "--reveal-key",
        is_flag=True,
        help="show the access key too (recorded in the audit log; operators only)",
    )
    @_common
    def show_command(
        ident: str, reveal_key: bool, server: str, admin_token: str | None, as_json: bool
    ) -> None:
        ctx = _ctx(server, admin_token, as_json)
        read = kind.reveal if reveal_key else kind.get
        ctx.show(ctx.run(lambda api: read(api, ident)), _print_object)

    @group.command("delete", help=kind.delete_help)
    @ident_arg
    @_common
    def delete_command(ident: str, server: str, admin_token: str | None, as_json: bool) -> None:
        ctx = _ctx(server, admin_token, as_json)
        _delete(ctx, lambda api: kind.delete(api, ident), kind.noun, ident)


@admin.group()
def product() -> None:
    """Products: the OneNET product id and access key devices sign with."""


_key_holder_commands(
    product,
    _KeyHolder(
        noun="product",
        article="a product",
        id_option="--id",
        id_help="product id to use (e.g. the OneNET one)",
        id_metavar="PID",
        columns=["pid", "name", "account_uid", "created_at"],
        rotate_help="Replace a product's access key; devices must sign with the new one.",
        show_help="Show a product and its device count (its key with --reveal-key).",
        delete_help="Delete a product that has no devices, packages or tasks left.",
        create=lambda api, pid, key, name: api.create_product(pid=pid, access_key=key, name=name),
        rotate=lambda api, pid, key: api.rotate_product_key(pid, access_key=key),
        page=lambda api, limit, after: api.list_products(limit=limit, after=after),
        get=lambda api, pid: api.get_product(pid),
        reveal=lambda api, pid: api.reveal_product_key(pid),
        delete=lambda api, pid: api.delete_product(pid),
    ),
)


@product.command("set-account")
@click.argument("pid")
@click.argument("uid")
@_common
def product_set_account(
    pid: str, uid: str, server: str, admin_token: str | None, as_json: bool
) -> None:
    """Make account UID the owner of product PID: its userid tokens then speak for the
    product's devices (fuse dialect)."""
    ctx = _ctx(server, admin_token, as_json)
    ctx.show(ctx.run(lambda api: api.set_product_account(pid, uid)), _print_object)


@product.command("clear-account")
@click.argument("pid")
@_common
def product_clear_account(pid: str, server: str, admin_token: str | None, as_json: bool) -> None:
    """Leave product PID without an owning account."""
    ctx = _ctx(server, admin_token, as_json)
    ctx.show(ctx.run(lambda api: api.clear_product_account(pid)), _print_object)


@admin.group()
def account() -> None:
    """Accounts: the OneNET user id and access key that userid tokens (fuse dialect) sign with."""


_key_holder_commands(
    account,
    _KeyHolder(
        noun="account",
        article="an account",
        id_option="--uid",
        id_help="user id to use (e.g. the OneNET one); else generated",
        id_metavar="UID",
        columns=["uid", "name", "created_at"],
        rotate_help="Replace an account's access key; userid tokens signed with the old one stop"
        " working.",
        show_help="Show an account and its product count (its key with --reveal-key).",
        delete_help="Delete an account that owns no product.",
        create=lambda api, uid, key, name: api.create_account(uid=uid, access_key=key, name=name),
        rotate=lambda api, uid, key: api.rotate_account_key(uid, access_key=key),
        page=lambda api, limit, after: api.list_accounts(limit=limit, after=after),
        get=lambda api, uid: api.get_account(uid),
        reveal=lambda api, uid: api.reveal_account_key(uid),
        delete=lambda api, uid: api.delete_account(uid),
    ),
)


@admin.group()
def device() -> None:
    """Devices: dev_id, name and optional device key, as baked into their firmware."""


_DEVICE_COLUMNS = ["dev_id", "pid", "name", "f_version", "s_version", "last_seen_at"]


@device.command("add")
@click.option("--pid", required=True, help="product id")
@click.option("--name", required=True, help="device name, unique in the product")
@click.option("--dev-id", type=int, help="dev_id to use (e.g. the OneNET one); else generated")
@click.option("--device-key", metavar="KEY", help="per-device key (base64)")
@click.option("--generate-key", is_flag=True, help="generate a per-device key")
@click.option("--auth-info", help="E9 lookup string (IMEI, serial...); defaults to the name")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="a label (repeatable)")
@_common
def device_add(
    pid: str, name: str, dev_id: int | None, device_key: str | None, generate_key: bool,
    auth_info: str | None, labels: tuple[str, ...], server: str, admin_token: str | None,
    as_json: bool,
) -> None:  # fmt: skip
    """Create a device."""
    ctx = _ctx(server, admin_token, as_json)
    given = _labels(labels, "--label") if labels else None
    created = ctx.run(
        lambda api: api.create_device(
            pid, name, dev_id=dev_id, device_key=device_key, generate_device_key=generate_key,
            auth_info=auth_info, labels=given,
        )
    )  # fmt: skip
    ctx.show(created, _print_object)


def _label_pairs(pairs: tuple[str, ...] | list[str], what: str) -> list[tuple[str, str]]:
    """``key=value`` words as pairs, in order (the server checks the characters)."""
    found: list[tuple[str, str]] = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            _fail(f"{what}: {pair!r} is not key=value")
        found.append((key, value))
    return found


def _labels(pairs: tuple[str, ...] | list[str], what: str) -> dict[str, str]:
    """``key=value`` words as a dict (a key given twice keeps its last value)."""
    return dict(_label_pairs(pairs, what))


def _read_devices(stream: IO[str], name: str) -> list[dict[str, Any]]:
    text = stream.read()
    stripped = text.lstrip()
    if stripped.startswith(("[", "{")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            _fail(f"{name}: not valid JSON: {exc}")
        if isinstance(data, dict):
            data = data.get("devices")
        if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
            _fail(f"{name}: JSON must be a list of device objects")
        return data
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows:
        _fail(
            f"{name}: no devices (CSV needs a header line: name,dev_id,device_key,auth_info,labels)"
        )
    devices: list[dict[str, Any]] = []
    for number, row in enumerate(rows, start=2):
        if None in row or "name" not in row:
            _fail(f"{name}: line {number}: expected the columns name,dev_id,device_key,auth_info")
        item: dict[str, Any] = {"name": (row.get("name") or "").strip()}
        dev_id = (row.get("dev_id") or "").strip()
        if dev_id:
            if not dev_id.isdigit():
                _fail(f"{name}: line {number}: dev_id {dev_id!r} is not a number")
            item["dev_id"] = int(dev_id)
        for key in ("device_key", "auth_info"):
            value = (row.get(key) or "").strip()
            if value:
                item[key] = value
        labels = (row.get("labels") or "").strip()
        if labels:  # key=value pairs separated by ";"
            item["labels"] = _labels(labels.split(";"), f"{name}: line {number}: labels")
        devices.append(item)
    return devices


@device.command("import")
@click.option("--pid", required=True, help="product id")
@click.argument("file", type=click.File("r", encoding="utf-8"))
@_common
def device_import(
    pid: str, file: IO[str], server: str, admin_token: str | None, as_json: bool
) -> None:
    """Create many devices from FILE ('-' for stdin), all or none.

    FILE is CSV with a header line (name,dev_id,device_key,auth_info; only name is required) or a
    JSON list of objects with those keys. An optional ``labels`` column holds key=value pairs
    separated by ``;`` (``region=eu;ring=canary``).
    """
    devices = _read_devices(file, file.name)
    ctx = _ctx(server, admin_token, as_json)
    result = {"items": _plain(ctx.run(lambda api: api.import_devices(pid, devices)))}

    def human(r: dict[str, Any]) -> None:
        _print_table(r["items"], _DEVICE_COLUMNS[:3])
        click.echo(f"{len(r['items'])} device(s) created")

    ctx.show(result, human)


@device.command("list")
@click.option("--pid", help="only this product's devices")
@click.option("--f-version", help="only devices at this FOTA version")
@click.option("--s-version", help="only devices at this SOTA version")
@click.option("--name-contains", help="only devices whose name contains this")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE",
              help="only devices with this label (repeatable: all of them)")  # fmt: skip
@click.option("--limit", type=click.IntRange(1, 1000))
@click.option("--after", metavar="CURSOR", help="continue after this page cursor")
@_common
def device_list(
    pid: str | None, f_version: str | None, s_version: str | None, name_contains: str | None,
    labels: tuple[str, ...], limit: int | None, after: str | None, server: str,
    admin_token: str | None, as_json: bool,
) -> None:  # fmt: skip
    """List devices."""
    ctx = _ctx(server, admin_token, as_json)
    wanted = _label_pairs(labels, "--label")  # pairs: a key given twice matches no device
    page = ctx.run(
        lambda api: api.list_devices(
            pid=pid, f_version=f_version, s_version=s_version, name_contains=name_contains,
            labels=wanted, limit=limit, after=after,
        )
    )  # fmt: skip
    ctx.show(page, lambda p: _print_page(p, _DEVICE_COLUMNS))


@device.command("show")
@click.argument("dev_id", type=int)
@_common
def device_show(dev_id: int, server: str, admin_token: str | None, as_json: bool) -> None:
    """Show a device with its versions and task history."""
    ctx = _ctx(server, admin_token, as_json)

    def human(d: dict[str, Any]) -> None:
        _print_object(d, skip=("tasks",))
        click.echo("")
        _print_table(
            d["tasks"],
            ["task_id", "package_id", "target", "state", "progress", "result_code", "updated_at"],
        )

    ctx.show(ctx.run(lambda api: api.get_device(dev_id)), human)


@device.command("history")
@click.argument("dev_id", type=int)
@click.option("--task", "task_id", type=int, help="only this task's events")
@click.option("--limit", type=click.IntRange(1, 1000))
@click.option("--after", metavar="CURSOR", help="continue after this page cursor")
@_common
def device_history(
    dev_id: int, task_id: int | None, limit: int | None, after: str | None, server: str,
    admin_token: str | None, as_json: bool,
) -> None:  # fmt: skip
    """Show a device's timeline: state changes, reports with their codes' names and texts,
    version reports and offers, oldest first."""
    ctx = _ctx(server, admin_token, as_json)
    page = ctx.run(
        lambda api: api.list_device_history(dev_id, task_id=task_id, limit=limit, after=after)
    )

    def human(p: dict[str, Any]) -> None:
        rows = [_history_row(event) for event in p.get("items", [])]
        _print_page({"items": rows, "next": p.get("next")}, _HISTORY_COLUMNS)

    ctx.show(page, human)


_HISTORY_COLUMNS = ["id", "time", "task", "kind", "via", "code", "change", "note"]


def _history_row(event: dict[str, Any]) -> dict[str, Any]:
    """One timeline event as table cells: ``205 md5 mismatch``, ``downloading -> failed``."""
    at_ms = event.get("at_ms")
    shown_at = (
        datetime.fromtimestamp(at_ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S.%fZ")[:-4] + "Z"
        if isinstance(at_ms, int)
        else "-"
    )
    code = event.get("code")
    if code is None:
        shown_code = "-"
    elif event.get("status_name"):
        shown_code = f"{code} {event['status_name']}"
    else:
        shown_code = str(code)
    before, after = event.get("from_state"), event.get("to_state")
    change = f"{before} -> {after}" if after else "-"
    notes = []
    if event.get("errno") is not None:
        notes.append(f"refused: errno {event['errno']} in {before}")
    if event.get("detail"):
        notes.append(str(event["detail"]))
    if event.get("status_text"):
        notes.append(str(event["status_text"]))
    short = event.get("short_download")
    if isinstance(short, dict):
        notes.append(f"short_download: served {short.get('served')} of {short.get('size')} bytes")
    via = "/".join(str(v) for v in (event.get("dialect"), event.get("endpoint")) if v)
    return {
        "id": event.get("id"),
        "time": shown_at,
        "task": event.get("task_id"),
        "kind": event.get("kind"),
        "via": via or None,
        "code": shown_code,
        "change": change,
        "note": "; ".join(notes) or None,
    }


@device.command("rotate-key")
@click.argument("dev_id", type=int)
@click.option("--device-key", metavar="KEY", help="the new key (base64); else generated")
@_common
def device_rotate_key(
    dev_id: int, device_key: str | None, server: str, admin_token: str | None, as_json: bool
) -> None:
    """Replace a device's key; tokens signed with the old one stop working at once."""
    ctx = _ctx(server, admin_token, as_json)
    key = device_key or None
    ctx.show(ctx.run(lambda api: api.rotate_device_key(dev_id, device_key=key)), _print_object)


@device.command("delete")
@click.argument("dev_id", type=int)
@_common
def device_delete(dev_id: int, server: str, admin_token: str | None, as_json: bool) -> None:
    """Delete a device with its upgrade history; cancel its open tasks first."""
    _delete(
        _ctx(server, admin_token, as_json), lambda api: api.delete_device(dev_id), "device", dev_id
    )


@device.command("label")
@click.argument("dev_id", type=int)
@click.argument("labels", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--remove", multiple=True, metavar="KEY", help="remove this label (repeatable)")
@click.option("--replace", is_flag=True, help="drop every label not given")
@_common
def device_label(
    dev_id: int, labels: tuple[str, ...], remove: tuple[str, ...], replace: bool, server: str,
    admin_token: str | None, as_json: bool,
) -> None:  # fmt: skip
    """Set (or with --remove, remove) a device's labels."""
    ctx = _ctx(server, admin_token, as_json)
    changes: dict[str, str | None] = {**_labels(labels, "labels"), **dict.fromkeys(remove)}
    if replace and remove:
        _fail("--replace drops every label not given; --remove makes no sense with it")
    result = ctx.run(lambda api: api.set_device_labels(dev_id, changes, replace=replace))
    ctx.show(result, _print_object)


@admin.group()
def campaign() -> None:
    """Campaigns: staged rollouts of a package with automatic gates and failure ceilings."""


_CAMPAIGN_COLUMNS = ["id", "name", "package_id", "state", "stage", "population", "version"]
_STAGE_INTS = ("count", "soak_s", "min_executed", "max_failed")
_STAGE_FLOATS = ("percent", "success_percent", "max_failed_percent")


def _stage(text: str) -> dict[str, Any]:
    """``--stage count=100,min_executed=20,max_failed_percent=10,on_failure=abort`` or ``rest``."""
    stage: dict[str, Any] = {}
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        if key == "rest" and not sep:
            stage["rest"] = True
        elif not sep:
            _fail(f"--stage: {part!r} is not key=value (or rest)")
        elif key in _STAGE_INTS or key in _STAGE_FLOATS:
            try:
                stage[key] = int(value) if key in _STAGE_INTS else float(value)
            except ValueError:
                _fail(f"--stage: {key} must be a number, not {value!r}")
        else:
            stage[key] = value  # name, on_success, on_failure: the server checks them
    return stage


_RATE_KEYS = ("per_minute", "growth", "period_s", "max_per_minute")


def _rate(text: str) -> dict[str, Any]:
    """``--rate 10`` (devices per minute) or ``--rate per_minute=10,growth=2,period_s=600``."""
    rate: dict[str, Any] = {}
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            key, value = "per_minute", key
        if key not in _RATE_KEYS:
            _fail(f"--rate: {key!r} is not one of {', '.join(_RATE_KEYS)}")
        try:
            rate[key] = int(value) if key == "period_s" else float(value)
        except ValueError:
            _fail(f"--rate: {key} must be a number, not {value!r}")
    return rate


def _campaign_spec(
    file: IO[str] | None, package_id: int | None, name: str, stages: tuple[str, ...],
    labels: tuple[str, ...], from_versions: tuple[str, ...], dev_ids: tuple[int, ...],
    deadline: str | None, rate: str | None = None, dynamic: bool = False,
) -> dict[str, Any]:  # fmt: skip
    if file is not None:
        try:
            spec = json.load(file)
        except json.JSONDecodeError as exc:
            _fail(f"{file.name}: not valid JSON: {exc}")
        if not isinstance(spec, dict):
            _fail(f"{file.name}: a campaign is a JSON object")
        return spec
    if package_id is None or not stages:
        _fail("give --package and at least one --stage (or --file)")
    selector: dict[str, Any] = {}
    if dev_ids:
        selector["dev_ids"] = list(dev_ids)
    if from_versions:
        selector["from_versions"] = list(from_versions)
    if labels:
        selector["labels"] = _labels(labels, "--label")
    spec = {
        "name": name,
        "package_id": package_id,
        "selector": selector,
        "stages": [_stage(s) for s in stages],
    }
    if deadline is not None:
        spec["deadline"] = _timestamp(deadline, "--deadline")
    if rate is not None:
        spec["rate"] = _rate(rate)
    if dynamic:
        spec["dynamic"] = True
    return spec


def _spec_options(command: F) -> F:
    options = [
        click.option("--file", type=click.File("r", encoding="utf-8"),
                     help="the whole campaign as JSON (the API's body)"),
        click.option("--package", "package_id", type=int, help="the package to roll out"),
        click.option("--name", default="", help="a label"),
        click.option("--stage", "stages", multiple=True, metavar="SPEC",
                     help="a stage, in order: count=N or percent=P (cumulative) or rest, then "
                     "soak_s, min_executed, success_percent, on_success, max_failed, "
                     "max_failed_percent, on_failure"),
        click.option("--label", "labels", multiple=True, metavar="KEY=VALUE",
                     help="only devices with this label (repeatable)"),
        click.option("--from-version", "from_versions", multiple=True,
                     help="only devices at this version (repeatable)"),
        click.option("--dev-id", "dev_ids", multiple=True, type=int,
                     help="exactly these devices (repeatable)"),
        click.option("--deadline", help="Unix seconds or ISO 8601: open device tasks fail then"),
        click.option("--rate", metavar="SPEC",
                     help="dispatch rate of every stage: devices per minute, or per_minute=N "
                     "with growth (factor per period), period_s and max_per_minute"),
        click.option("--dynamic", is_flag=True,
                     help="devices that come to match the selector while it runs join it"),
    ]  # fmt: skip
    for option in reversed(options):
        command = option(command)
    return command


def _print_campaign(c: dict[str, Any]) -> None:
    _print_object(c, skip=("stages", "events", "selector", "failure_classes"))
    for stage in c.get("stages", []):
        counts = stage["counts"]
        click.echo(
            f"  stage {stage['index'] + 1}: planned {stage['planned']}, "
            + ", ".join(f"{k} {v}" for k, v in counts.items())
        )
    for event in reversed(c.get("events", [])[:10]):
        who = event.get("by") or event["actor"]
        click.echo(f"  v{event['version']} {_human_time(event['at'])} {who}: {event['detail']}")


def _print_preview(p: dict[str, Any]) -> None:
    click.echo(f"{p['population']} matching device(s); {p['busy']} busy now (they are skipped)")
    for stage in p["stages"]:
        sample = ", ".join(str(d) for d in stage["sample"])
        click.echo(f"  {stage['name']}: {stage['devices']} device(s) ({sample}...)")


@campaign.command("create")
@_spec_options
@_common
def campaign_create(
    file: IO[str] | None, package_id: int | None, name: str, stages: tuple[str, ...],
    labels: tuple[str, ...], from_versions: tuple[str, ...], dev_ids: tuple[int, ...],
    deadline: str | None, rate: str | None, dynamic: bool, server: str, admin_token: str | None,
    as_json: bool,
) -> None:  # fmt: skip
    """Create a draft campaign (refused when its stages cannot be satisfied)."""
    spec = _campaign_spec(
        file, package_id, name, stages, labels, from_versions, dev_ids, deadline, rate, dynamic
    )
    ctx = _ctx(server, admin_token, as_json)
    ctx.show(ctx.run(lambda api: api.create_campaign(spec)), _print_campaign)


@campaign.command("preview")
@_spec_options
@_common
def campaign_preview(
    file: IO[str] | None, package_id: int | None, name: str, stages: tuple[str, ...],
    labels: tuple[str, ...], from_versions: tuple[str, ...], dev_ids: tuple[int, ...],
    deadline: str | None, rate: str | None, dynamic: bool, server: str, admin_token: str | None,
    as_json: bool,
) -> None:  # fmt: skip
    """Dry run: each stage's devices, creating nothing."""
    spec = _campaign_spec(
        file, package_id, name, stages, labels, from_versions, dev_ids, deadline, rate, dynamic
    )
    ctx = _ctx(server, admin_token, as_json)
    ctx.show(ctx.run(lambda api: api.preview_campaign_spec(spec)), _print_preview)


@campaign.command("list")
@click.option("--state", type=click.Choice(get_args(CampaignState)))
@click.option("--limit", type=click.IntRange(1, 1000))
@click.option("--after", metavar="CURSOR", help="continue after this page cursor")
@_common
def campaign_list(
    state: CampaignState | None, limit: int | None, after: str | None, server: str,
    admin_token: str | None, as_json: bool,
) -> None:  # fmt: skip
    """List campaigns."""
    ctx = _ctx(server, admin_token, as_json)
    page = ctx.run(lambda api: api.list_campaigns(state=state, limit=limit, after=after))
    ctx.show(page, lambda p: _print_page(p, _CAMPAIGN_COLUMNS))


@campaign.command("show")
@click.argument("campaign_id", type=int)
@_common
def campaign_show(campaign_id: int, server: str, admin_token: str | None, as_json: bool) -> None:
    """Show a campaign with per-stage counters and its latest decisions."""
    ctx = _ctx(server, admin_token, as_json)
    ctx.show(ctx.run(lambda api: api.get_campaign(campaign_id)), _print_campaign)


@campaign.command("events")
@click.argument("campaign_id", type=int)
@_common
def campaign_events(campaign_id: int, server: str, admin_token: str | None, as_json: bool) -> None:
    """Every decision and action of a campaign, with its numbers."""
    ctx = _ctx(server, admin_token, as_json)
    result = {"items": _plain(ctx.run(lambda api: api.list_campaign_events(campaign_id)))}
    ctx.show(result, lambda r: _print_table(r["items"], ["version", "at", "actor", "by", "detail"]))


def _campaign_action(verb: CampaignAction, text: str) -> click.Command:
    @campaign.command(verb, help=text)
    @click.argument("campaign_id", type=int)
    @click.option("--if-version", type=int,
                  help="act only if the campaign is still at this version")  # fmt: skip
    @_common
    def command(
        campaign_id: int, if_version: int | None, server: str, admin_token: str | None,
        as_json: bool,
    ) -> None:  # fmt: skip
        ctx = _ctx(server, admin_token, as_json)
        result = ctx.run(lambda api: api.act_on_campaign(campaign_id, verb, if_version=if_version))
        ctx.show(result, _print_campaign)

    return command


campaign_start = _campaign_action("start", "Start a draft campaign (activates its first stage).")
campaign_pause = _campaign_action("pause", "Pause a campaign and its device tasks.")
campaign_resume = _campaign_action("resume", "Resume a paused campaign.")
campaign_advance = _campaign_action("advance", "Advance to the next stage now.")
campaign_abort = _campaign_action("abort", "Abort a campaign; its open device tasks are cancelled.")


@campaign.command("retry-failed")
@click.argument("campaign_id", type=int)
@click.option("--class", "classes", multiple=True,
              type=click.Choice(get_args(FailureClassName)),
              help="only failures of this class (repeatable; default all)")  # fmt: skip
@_common
def campaign_retry_failed(
    campaign_id: int, classes: tuple[FailureClassName, ...], server: str,
    admin_token: str | None, as_json: bool,
) -> None:  # fmt: skip
    """Give the failed members a new task."""
    ctx = _ctx(server, admin_token, as_json)
    chosen = list(classes) or None  # none given: every class
    result = ctx.run(lambda api: api.retry_failed_campaign(campaign_id, classes=chosen))
    ctx.show(result, _print_campaign)


@campaign.command("add-devices")
@click.argument("campaign_id", type=int)
@click.argument("dev_ids", type=int, nargs=-1, required=True)
@_common
def campaign_add_devices(
    campaign_id: int, dev_ids: tuple[int, ...], server: str, admin_token: str | None,
    as_json: bool,
) -> None:  # fmt: skip
    """Add devices to a campaign."""
    ctx = _ctx(server, admin_token, as_json)
    result = ctx.run(lambda api: api.add_campaign_devices(campaign_id, list(dev_ids)))
    ctx.show(result, _print_campaign)


@admin.group()
def package() -> None:
    """Packages: firmware (FOTA) or application (SOTA) files, full or differential."""


_PACKAGE_COLUMNS = ["id", "pid", "module_type", "kind", "from_version", "target", "size",
                    "file_name"]  # fmt: skip


@package.command("upload")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--pid", required=True, help="product id")
@click.option("--type", "module_type", type=click.Choice(["fota", "sota"]), required=True,
              help="fota: module firmware; sota: application/MCU software")  # fmt: skip
@click.option("--target", required=True, help="the version the package installs")
@click.option("--kind", type=click.Choice(["full", "diff"]), default="full", show_default=True)
@click.option("--from-version", help="differential packages: the version they apply to")
@click.option("--manuf", help="manufacturer code (spec Appendix A)")
@click.option("--model", help="module or chip code (spec Appendix A)")
@click.option("--file-name", help="name devices see [default: FILE's name]")
@_common
def package_upload(
    file: Path, pid: str, module_type: str, target: str, kind: str, from_version: str | None,
    manuf: str | None, model: str | None, file_name: str | None, server: str,
    admin_token: str | None, as_json: bool,
) -> None:  # fmt: skip
    """Upload FILE; the server computes size, md5 and sha256."""
    ctx = _ctx(server, admin_token, as_json)
    try:
        size = file.stat().st_size
    except OSError as exc:
        _fail(f"{file}: {exc.strerror}")
    result = ctx.run(
        lambda api: api.upload_package(
            file, pid=pid, module_type=cast(Any, module_type), target=target,
            kind=cast(Any, kind), from_version=from_version, manuf=manuf, model=model,
            file_name=file_name or file.name, size=size,
        )
    )  # fmt: skip
    ctx.show(result, _print_object)


@package.command("list")
@click.option("--pid", help="only this product's packages")
@click.option("--type", "module_type", type=click.Choice(["fota", "sota"]))
@click.option("--limit", type=click.IntRange(1, 1000))
@click.option("--after", metavar="CURSOR", help="continue after this page cursor")
@_common
def package_list(
    pid: str | None, module_type: str | None, limit: int | None, after: str | None, server: str,
    admin_token: str | None, as_json: bool,
) -> None:  # fmt: skip
    """List packages."""
    ctx = _ctx(server, admin_token, as_json)
    page = ctx.run(
        lambda api: api.list_packages(
            pid=pid, module_type=cast(Any, module_type), limit=limit, after=after
        )
    )
    ctx.show(page, lambda p: _print_page(p, _PACKAGE_COLUMNS))


@package.command("show")
@click.argument("package_id", type=int)
@_common
def package_show(package_id: int, server: str, admin_token: str | None, as_json: bool) -> None:
    """Show a package."""
    ctx = _ctx(server, admin_token, as_json)
    ctx.show(ctx.run(lambda api: api.get_package(package_id)), _print_object)


@package.command("delete")
@click.argument("package_id", type=int)
@_common
def package_delete(package_id: int, server: str, admin_token: str | None, as_json: bool) -> None:
    """Delete a package that no task uses."""
    _delete(
        _ctx(server, admin_token, as_json),
        lambda api: api.delete_package(package_id),
        "package",
        package_id,
    )


@admin.group()
def task() -> None:
    """Upgrade tasks: one package for a set of devices."""


_TASK_COLUMNS = ["id", "pid", "package_id", "target", "status", "total", "counts"]


def _print_task(t: dict[str, Any]) -> None:
    _print_object(t, skip=("devices", "devices_next", "skipped", "cancelled"))
    for key in ("skipped", "cancelled"):
        if t.get(key):
            click.echo(f"{key}: {_cell(key, t[key])}")
    if "devices" in t:
        click.echo("")
        _print_table(
            t["devices"], ["dev_id", "name", "state", "progress", "result_code", "updated_at"]
        )
        if t.get("devices_next"):
            click.echo(f"(more devices: --after {t['devices_next']})")


@task.command("create")
@click.option("--package", "package_id", type=int, required=True, help="package id")
@click.option("--dev-id", "dev_ids", type=int, multiple=True, help="target device (repeatable)")
@click.option(
    "--from-version",
    "from_versions",
    multiple=True,
    help="target every device of the product at this version (repeatable)",
)
@click.option("--signal", type=int, default=0, show_default=True, help="advisory minimum signal")
@click.option("--power", type=int, default=0, show_default=True, help="advisory minimum battery")
@click.option("--retry", type=int, default=0, show_default=True, help="advisory retry budget")
@click.option(
    "--interval", type=int, default=0, show_default=True, help="advisory seconds between retries"
)
@click.option("--start-time", help="Unix seconds or ISO 8601; devices see the task from then")
@click.option("--deadline", help="Unix seconds or ISO 8601; open upgrades then fail")
@click.option(
    "--on-open",
    type=click.Choice(["fail", "skip", "cancel"]),
    default="fail",
    show_default=True,
    help="a targeted device that already has an open task",
)
@_common
def task_create(
    package_id: int, dev_ids: tuple[int, ...], from_versions: tuple[str, ...], signal: int,
    power: int, retry: int, interval: int, start_time: str | None, deadline: str | None,
    on_open: str, server: str, admin_token: str | None, as_json: bool,
) -> None:  # fmt: skip
    """Create an upgrade task for explicit devices or for every device at given versions."""
    if bool(dev_ids) == bool(from_versions):
        _fail("give --dev-id or --from-version (one kind, repeatable)")
    start = _timestamp(start_time, "--start-time")
    end = _timestamp(deadline, "--deadline")
    ctx = _ctx(server, admin_token, as_json)
    created = ctx.run(
        lambda api: api.create_task(
            package_id, dev_ids=list(dev_ids) or None, from_versions=list(from_versions) or None,
            signal=signal, power=power, retry=retry, interval=interval, start_time=start,
            deadline=end, on_open=cast(Any, on_open),
        )
    )  # fmt: skip
    ctx.show(created, _print_task)


@task.command("list")
@click.option("--pid", help="only this product's tasks")
@click.option("--package", "package_id", type=int, help="only tasks of this package")
@click.option("--status", type=click.Choice(["active", "paused", "cancelled", "finished"]))
@click.option("--limit", type=click.IntRange(1, 1000))
@click.option("--after", metavar="CURSOR", help="continue after this page cursor")
@_common
def task_list(
    pid: str | None, package_id: int | None, status: str | None, limit: int | None,
    after: str | None, server: str, admin_token: str | None, as_json: bool,
) -> None:  # fmt: skip
    """List tasks with per-state counts."""
    ctx = _ctx(server, admin_token, as_json)
    page = ctx.run(
        lambda api: api.list_tasks(
            pid=pid, package_id=package_id, status=cast(Any, status), limit=limit, after=after
        )
    )
    ctx.show(page, lambda p: _print_page(p, _TASK_COLUMNS))


@task.command("show")
@click.argument("task_id", type=int)
@click.option("--state", help="only devices in this state (e.g. failed)")
@click.option("--limit", type=click.IntRange(1, 1000))
@click.option("--after", metavar="CURSOR", help="continue after this device cursor")
@_common
def task_show(
    task_id: int, state: str | None, limit: int | None, after: str | None, server: str,
    admin_token: str | None, as_json: bool,
) -> None:  # fmt: skip
    """Show a task: settings, counts per state, and its devices' states and progress."""
    ctx = _ctx(server, admin_token, as_json)
    detail = ctx.run(
        lambda api: api.get_task(task_id, state=cast(Any, state), limit=limit, after=after)
    )
    ctx.show(detail, _print_task)


@task.command("delete")
@click.argument("task_id", type=int)
@_common
def task_delete(task_id: int, server: str, admin_token: str | None, as_json: bool) -> None:
    """Delete a finished task with its devices' part of it; cancel it first if still open."""
    _delete(
        _ctx(server, admin_token, as_json), lambda api: api.delete_task(task_id), "task", task_id
    )


def _action_command(verb: Action, text: str) -> click.Command:
    @task.command(verb, help=text)
    @click.argument("task_id", type=int)
    @click.option("--dev-id", type=int, help="only this device's part of the task")
    @_common
    def command(
        task_id: int, dev_id: int | None, server: str, admin_token: str | None, as_json: bool
    ) -> None:
        ctx = _ctx(server, admin_token, as_json)
        if dev_id is None:
            result = ctx.run(lambda api: api.act_on_task(task_id, verb))

            def human(r: dict[str, Any]) -> None:
                _print_task(r)
                click.echo(f"{r['changed']} device task(s) changed")

            ctx.show(result, human)
        else:
            one = dev_id
            view = ctx.run(lambda api: api.act_on_device_task(task_id, one, verb))
            ctx.show(view, _print_object)

    return command


task_pause = _action_command("pause", "Pause a task (to-be-upgraded and downloading devices; T2).")
task_resume = _action_command("resume", "Resume a paused task (T3).")
task_cancel = _action_command("cancel", "Cancel a task (every open device; T4).")

# Token management and the audit log live in their own module, which uses the helpers above.
from onenet_ota.cli.admin_access import audit, token  # noqa: E402

admin.add_command(token)
admin.add_command(audit)

__all__ = ["admin"]
