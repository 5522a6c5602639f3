"""The database schema (SQLAlchemy Core). Alembic migrations are generated from and checked
against these tables; SQLite and PostgreSQL share them.

Vocabulary: a **task** is what an operator creates (one package, many devices, one policy); a
**device task** is one device's upgrade inside it: the spec's "task" (§1), the row the device
protocol's state machine runs on. A **token** is a download token issued for a device task (D13).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
    text,
)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# Ids that the management API shows or that rows refer to are never reused, so that an id names
# one row forever: a repeated "delete task 7" (say after a lost reply) must not hit a newer task
# that got the freed number. PostgreSQL sequences never hand a number out twice; SQLite reuses the
# largest rowid after a delete unless the table is AUTOINCREMENT (sqlite_autoincrement=True).

# Times are Unix seconds (float seconds where sub-second order matters are not needed: ints).

# An account signs ``userid/{uid}`` tokens with its access key; such a token speaks for every
# device of the products the account owns (§13.3, F2, F12). ``uid`` is the canonical decimal of
# auth.user_resource (1..2^63-1, no leading zero), kept as the text devices sign.
accounts = Table(
    "accounts",
    metadata,
    Column("uid", String(19), primary_key=True),
    Column("name", String(128), nullable=False, server_default=""),
    Column("access_key", String(128), nullable=False),
    Column("created_at", BigInteger, nullable=False),
)

products = Table(
    "products",
    metadata,
    Column("pid", String(32), primary_key=True),
    Column("name", String(128), nullable=False, server_default=""),
    Column("access_key", String(128), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    # The account that owns the product (F12), if any.
    Column("account_uid", String(19), ForeignKey("accounts.uid"), nullable=True),
    Index("ix_products_account_uid", "account_uid"),
)

devices = Table(
    "devices",
    metadata,
    Column("dev_id", BigInteger, primary_key=True, autoincrement=False),
    Column("pid", String(32), ForeignKey("products.pid"), nullable=False),
    Column("name", String(64), nullable=False),
    Column("auth_info", String(256), nullable=False),
    Column("device_key", String(128), nullable=True),
    Column("f_version", String(20), nullable=True),
    Column("s_version", String(20), nullable=True),
    Column("created_at", BigInteger, nullable=False),
    Column("last_seen_at", BigInteger, nullable=True),
    UniqueConstraint("pid", "name"),
    Index("ix_devices_pid_auth_info", "pid", "auth_info"),
)

packages = Table(
    "packages",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("pid", String(32), ForeignKey("products.pid"), nullable=False),
    Column("module_type", SmallInteger, nullable=False),  # 1 FOTA, 2 SOTA
    Column("kind", SmallInteger, nullable=False),  # 1 full, 2 differential
    Column("from_version", String(20), nullable=True),
    Column("target", String(20), nullable=False),
    Column("manuf", String(32), nullable=True),
    Column("model", String(32), nullable=True),
    Column("file_name", String(64), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("md5", String(32), nullable=False),
    Column("sha256", String(64), nullable=False),  # the content address of the stored file
    Column("created_at", BigInteger, nullable=False),
    CheckConstraint("module_type IN (1, 2)", name="module_type"),
    CheckConstraint("kind IN (1, 2)", name="kind"),
    CheckConstraint("size >= 1", name="size"),
    CheckConstraint("(kind = 2) = (from_version IS NOT NULL)", name="from_version"),
    sqlite_autoincrement=True,
)

tasks = Table(
    "tasks",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("pid", String(32), ForeignKey("products.pid"), nullable=False),
    Column("package_id", Integer, ForeignKey("packages.id"), nullable=False),
    Column("module_type", SmallInteger, nullable=False),  # copied from the package
    Column("signal", Integer, nullable=False, server_default=text("0")),
    Column("power", Integer, nullable=False, server_default=text("0")),
    Column("retry", Integer, nullable=False, server_default=text("0")),
    Column("interval", Integer, nullable=False, server_default=text("0")),
    Column("start_time", BigInteger, nullable=False),
    Column("deadline", BigInteger, nullable=True),
    # Operator-facing status of the whole task: active, paused, cancelled.
    Column("status", String(16), nullable=False, server_default="active"),
    Column("created_at", BigInteger, nullable=False),
    Index("ix_tasks_package_id", "package_id"),
    sqlite_autoincrement=True,
)

device_tasks = Table(
    "device_tasks",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("task_id", Integer, ForeignKey("tasks.id"), nullable=False),
    Column("dev_id", BigInteger, ForeignKey("devices.dev_id"), nullable=False),
    Column("module_type", SmallInteger, nullable=False),  # copied from the task
    Column("state", SmallInteger, nullable=False),  # protocol.states.TaskState
    Column("paused_from", SmallInteger, nullable=True),
    Column("progress", SmallInteger, nullable=False, server_default=text("0")),
    Column("result_code", SmallInteger, nullable=True),  # the last failure/success code reported
    Column("current_token", String(32), nullable=True),
    Column("token_issued_at", BigInteger, nullable=True),
    Column("updated_at", BigInteger, nullable=False),
    Column("finished_at", BigInteger, nullable=True),
    UniqueConstraint("task_id", "dev_id"),
    Index("ix_device_tasks_task_id_state", "task_id", "state"),
    # D23: at most one open (1, 2, 3 or paused=7) device task per device and type, enforced by the
    # database so concurrent task creation cannot break it.
    Index(
        "uq_device_tasks_open",
        "dev_id",
        "module_type",
        unique=True,
        sqlite_where=text("state IN (1, 2, 3, 7)"),
        postgresql_where=text("state IN (1, 2, 3, 7)"),
    ),
    sqlite_autoincrement=True,
)

tokens = Table(
    "tokens",
    metadata,
    Column("token", String(32), primary_key=True),
    Column("device_task_id", Integer, ForeignKey("device_tasks.id"), nullable=False),
    Column("issued_at", BigInteger, nullable=False),
    Index("ix_tokens_device_task_id", "device_task_id"),
)

# One row per committed change that caches of the device API depend on (server/changes.py): every
# server process reads the rows it has not seen and drops what they name. Rows are pruned after a
# while; they are a feed, not a history.
cache_changes = Table(
    "cache_changes",
    metadata,
    # SQLite: INTEGER PRIMARY KEY AUTOINCREMENT (ids never reused, so a gap means pruned rows).
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("dev_id", BigInteger, nullable=True),  # NULL: anything may have changed
    Column("xid", BigInteger, nullable=True),  # PostgreSQL: the id of the writing transaction
    Column("origin", BigInteger, nullable=False, server_default=text("0")),  # the writing process
    Column("created_at", BigInteger, nullable=False),
    # What of the device changed (changes.Scope): 0 anything, 1 only its tasks and versions.
    Column("scope", SmallInteger, nullable=False, server_default=text("0")),
    Index("ix_cache_changes_xid", "xid"),
    Index("ix_cache_changes_created_at", "created_at"),
    sqlite_autoincrement=True,
)

# Bearer tokens of the management API (server/api_tokens.py). Only a keyed hash of each secret is
# kept; a revoked token keeps its row (revoked_at set), so its name and id stay taken and the
# audit log's names stay unambiguous.
api_tokens = Table(
    "api_tokens",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False),
    Column("role", String(16), nullable=False),
    Column("prefix", String(16), nullable=False, server_default=""),  # shown in lists
    Column("secret_hash", String(64), nullable=False),  # hex HMAC-SHA256 of the secret
    Column("created_at", BigInteger, nullable=False),
    Column("last_used_at", BigInteger, nullable=True),  # to the minute, not per request
    Column("revoked_at", BigInteger, nullable=True),
    UniqueConstraint("name"),
    UniqueConstraint("secret_hash"),
    CheckConstraint("role IN ('viewer', 'operator', 'admin')", name="role"),
    sqlite_autoincrement=True,
)

# Who changed what, when, from what to what (server/audit.py): one row per management action
# and per automatic decision, written in the transaction of the change itself.
audit_log = Table(
    "audit_log",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("created_at", BigInteger, nullable=False),
    Column("actor", String(80), nullable=False),  # a token's name, or system:<component>
    Column("action", String(64), nullable=False),  # e.g. product.create, task.pause
    Column("target", String(200), nullable=False),  # e.g. product:123123, task:7
    Column("before_state", Text, nullable=True),  # JSON, secrets redacted
    Column("after_state", Text, nullable=True),
    Column("detail", Text, nullable=True),  # the numbers behind an automatic decision
    Index("ix_audit_log_actor", "actor"),
    Index("ix_audit_log_action", "action"),
    Index("ix_audit_log_target", "target"),
    Index("ix_audit_log_created_at", "created_at"),
    sqlite_autoincrement=True,
)

# A device's timeline (server/timeline.py): one row per state change of a device task, per report
# (accepted or refused), per version report that changed a stored version, and one per device
# task and dialect for its first offer. Written in the transaction of what it records. No foreign
# keys: rows are deleted with their device tasks (or device) by the management service, and a
# version report may belong to no device task.
device_task_events = Table(
    "device_task_events",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("dev_id", BigInteger, nullable=False),
    Column("device_task_id", Integer, nullable=True),  # NULL: a version report without a task
    Column("task_id", Integer, nullable=True),
    Column("at_ms", BigInteger, nullable=False),  # Unix milliseconds
    # offered, state, report, progress, version (timeline.EventKind)
    Column("kind", String(16), nullable=False),
    # Who caused it: the device's dialect (classic, studio, fuse) and endpoint label ("E7",
    # "S-R", "F-R"), or dialect NULL and endpoint "admin" / "deadline".
    Column("dialect", String(8), nullable=True),
    Column("endpoint", String(16), nullable=True),
    Column("code", SmallInteger, nullable=True),  # the reported step or status code
    Column("errno", SmallInteger, nullable=True),  # a refused report's errno (classic numbers)
    Column("from_state", SmallInteger, nullable=True),
    Column("to_state", SmallInteger, nullable=True),
    Column("detail", String(64), nullable=True),  # a version report: "f_version=1.2"
    Index("ix_device_task_events_dev_id_id", "dev_id", "id"),
    Index("ix_device_task_events_device_task_id", "device_task_id"),
    # One first-offer row per device task and dialect: two workers offering at once cannot both
    # insert one (the loser's transaction is retried and finds the row).
    Index(
        "uq_device_task_events_offered",
        "device_task_id",
        "dialect",
        unique=True,
        sqlite_where=text("kind = 'offered'"),
        postgresql_where=text("kind = 'offered'"),
    ),
    sqlite_autoincrement=True,
)

# Bytes of the package served per device task, summed in memory by each worker and added here
# periodically (server/timeline.py: ServedBytes), never per chunk.
device_task_bytes = Table(
    "device_task_bytes",
    metadata,
    Column("device_task_id", Integer, primary_key=True, autoincrement=False),
    Column("served", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
)

# Free-form ``key=value`` labels on devices, for campaign selectors and device lists. One row per
# label so that "devices with region=eu" is an indexed lookup on both databases.
device_labels = Table(
    "device_labels",
    metadata,
    Column("dev_id", BigInteger, ForeignKey("devices.dev_id"), primary_key=True),
    Column("key", String(64), primary_key=True),
    Column("value", String(128), nullable=False),
    Index("ix_device_labels_key_value", "key", "value"),
)

# Staged campaigns (server/campaigns.py, server/campaign_engine.py). ``selector``, ``stages`` and
# ``failure_classes`` are JSON text validated by the engine's models. ``version`` grows with every
# change: every action is a compare-and-set on it, so a concurrent one applies once.
campaigns = Table(
    "campaigns",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(128), nullable=False, server_default=""),
    Column("pid", String(32), ForeignKey("products.pid"), nullable=False),
    Column("package_id", Integer, ForeignKey("packages.id"), nullable=False),
    Column("module_type", SmallInteger, nullable=False),
    Column("selector", Text, nullable=False),
    Column("stages", Text, nullable=False),
    Column("failure_classes", Text, nullable=False, server_default="{}"),
    Column("signal", Integer, nullable=False, server_default=text("0")),
    Column("power", Integer, nullable=False, server_default=text("0")),
    Column("retry", Integer, nullable=False, server_default=text("0")),
    Column("interval", Integer, nullable=False, server_default=text("0")),
    Column("start_time", BigInteger, nullable=True),
    Column("deadline", BigInteger, nullable=True),
    Column("salt", String(32), nullable=False),
    Column("state", String(16), nullable=False),  # draft, running, paused, finished, aborted
    Column("stage", Integer, nullable=False, server_default=text("-1")),  # -1: not started
    Column("stage_started_at", BigInteger, nullable=True),
    # The highest stage whose members were activated: an advance is committed first and its
    # stage activated in the next transaction, so a decision waits for no insert of thousands.
    Column("activated_stage", Integer, nullable=False, server_default=text("-1")),
    Column("population", Integer, nullable=False, server_default=text("0")),
    Column("version", Integer, nullable=False, server_default=text("0")),
    Column("created_at", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
    # The dispatch rate (JSON of DispatchRate; NULL: a stage's members all at once), whether
    # newly matching devices join while it runs, and the current rate's start (Unix ms) with
    # the devices dispatched since: the rate restarts at every stage and every resume.
    Column("rate", Text, nullable=True),
    Column("dynamic", Boolean, nullable=False, server_default=false()),
    Column("dispatch_since_ms", BigInteger, nullable=True),
    Column("dispatched", Integer, nullable=False, server_default=text("0")),
    Index("ix_campaigns_state", "state"),
    sqlite_autoincrement=True,
)

# A campaign's members once activated: the stage that activated them and the task holding their
# device task (a retry gives a device a new task).
campaign_devices = Table(
    "campaign_devices",
    metadata,
    Column("campaign_id", Integer, ForeignKey("campaigns.id"), primary_key=True),
    Column("dev_id", BigInteger, ForeignKey("devices.dev_id"), primary_key=True),
    Column("stage", Integer, nullable=False),
    Column("task_id", Integer, ForeignKey("tasks.id"), nullable=True),  # NULL: skipped (D23)
    Column("activated_at", BigInteger, nullable=False),
    # Chosen for its stage, its device task waiting for the dispatch rate (task_id NULL).
    Column("pending", Boolean, nullable=False, server_default=false()),
    Index("ix_campaign_devices_campaign_id_stage", "campaign_id", "stage"),
    Index("ix_campaign_devices_task_id", "task_id"),
    Index("ix_campaign_devices_dev_id", "dev_id"),
)

# Every decision and action on a campaign, once: ``version`` is the campaign version it made,
# unique per campaign, so a decision applied twice would break the constraint.
campaign_events = Table(
    "campaign_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("campaign_id", Integer, ForeignKey("campaigns.id"), nullable=False),
    Column("version", Integer, nullable=False),
    Column("at", BigInteger, nullable=False),
    Column("actor", String(32), nullable=False),  # "auto" or "operator"
    # Who: the acting API token's name, or system:campaigns for an automatic decision, as in
    # the audit log. NULL for events recorded before the column existed.
    Column("by", String(80), nullable=True),
    Column("action", String(32), nullable=False),
    Column("stage", Integer, nullable=False),
    Column("from_state", String(16), nullable=False),
    Column("to_state", String(16), nullable=False),
    Column("detail", String(1000), nullable=False),
    Column("numbers", Text, nullable=False, server_default="{}"),
    UniqueConstraint("campaign_id", "version"),
    sqlite_autoincrement=True,
)

# Leases: the process that holds ``name`` until ``expires_at`` does that job alone (the campaign
# evaluator). Taken and renewed by compare-and-set (server/campaigns.py).
leases = Table(
    "leases",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("holder", String(64), nullable=False, server_default=""),
    Column("expires_at", BigInteger, nullable=False),  # Unix milliseconds
)
