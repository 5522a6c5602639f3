"""The web console at ``/console``: server-rendered pages over the management API.

The console holds no rules of its own. Pages read through the same service as the management
API, and every change is sent through the management API's own dispatcher
(:meth:`~onenet_ota.server.admin_api.AdminApi.handle_signed_in`), so validation, roles and
errors are the API's, word for word. What the console adds is presentation and the browser's
security: a signed session cookie (:mod:`.sessions`), a CSRF token on every change, a
Content-Security-Policy that allows only the console's own files (no inline script, no outside
origin), and escaping of everything shown (Jinja2 autoescape).

Live counters come over Server-Sent Events (:mod:`.live`): at most two updates a second per
page, read once per period however many pages watch.
"""

from __future__ import annotations

import asyncio
import calendar
import hashlib
import json
import logging
import math
import mimetypes
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import parse_qsl, quote, urlencode

import jinja2
from babel.support import NullTranslations
from pydantic import BaseModel

from onenet_ota.management.models import ApiTokenPage, CampaignDetail
from onenet_ota.protocol.code_texts import code_text
from onenet_ota.server import admin_service as svc
from onenet_ota.server import audit
from onenet_ota.server import campaigns as camp
from onenet_ota.server.admin_api import PREFIX as API
from onenet_ota.server.admin_api import AdminApi
from onenet_ota.server.api_tokens import ROLES, ApiTokenCreated, Principal, role_allows
from onenet_ota.server.campaign_engine import action_refusal
from onenet_ota.server.console import PREFIX, i18n
from onenet_ota.server.console.live import LiveHub
from onenet_ota.server.console.principals import TokenDirectory
from onenet_ota.server.console.sessions import Session, SessionCodec
from onenet_ota.server.http import Request, Response, Stream

__all__ = ["LABELS", "Console"]

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

SESSION_COOKIE: Final = "onenet_ota_session"
LANG_COOKIE: Final = "onenet_ota_lang"
MAX_FORM: Final = 16 * 1024
MAX_CAMPAIGN_FORM: Final = 2 * 1024 * 1024
"""A campaign's form may list devices by ID, up to the API's 100,000 (about 20 bytes each)."""
STREAM_LIFETIME: Final = 60.0
"""Seconds an event stream lasts; the browser's EventSource then reconnects by itself, which
also re-checks the session, so a revoked token stops receiving within this time at most."""

_PID: Final = r"[A-Za-z0-9]{1,32}"  # the management API's pid rule
_UID: Final = r"[1-9][0-9]{0,18}"  # a canonical decimal uid (F12)
_HERE = Path(__file__).parent
_STATIC = _HERE / "static"

CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_SECURITY_HEADERS: Final = (
    ("Content-Security-Policy", CSP),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "same-origin"),
    ("X-Frame-Options", "DENY"),
)


def N_(message: str) -> str:
    """Marks ``message`` for the catalogue; it is translated where it is shown."""
    return message


LABELS: Final[Mapping[str, str]] = {
    # device-task states (protocol.states) and task statuses
    "to_be_upgraded": N_("to be upgraded"),
    "downloading": N_("downloading"),
    "upgrading": N_("upgrading"),
    "succeeded": N_("succeeded"),
    "failed": N_("failed"),
    "cancelled": N_("cancelled"),
    "paused": N_("paused"),
    "active": N_("active"),
    "idle": N_("idle"),
    # roles
    "viewer": N_("viewer"),
    "operator": N_("operator"),
    "admin": N_("admin"),
    # campaign states, stage counters and failure classes (management.models)
    "draft": N_("draft"),
    "running": N_("running"),
    "finished": N_("finished"),
    "aborted": N_("aborted"),
    "targeted": N_("targeted"),
    "failed_package": N_("failed (package)"),
    "failed_environment": N_("failed (environment)"),
    "deferred": N_("deferred"),
    "open": N_("open"),
    "executed": N_("executed"),
    "package": N_("package"),
    "environment": N_("environment"),
    "deferral": N_("deferral"),
    # device timeline events (server.timeline)
    "offered": N_("task offered"),
    "state": N_("state changed"),
    "report": N_("status reported"),
    "progress": N_("progress reported"),
    "version": N_("version reported"),
}
"""Display names of the values the console shows as words, by value."""


class _Redirect(Exception):
    def __init__(self, location: str) -> None:
        self.location = location


class _Refused(Exception):
    """A request the console answers with a page saying why (no traceback, no 5xx)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class _Page:
    method: str
    pattern: re.Pattern[str]
    handler: Callable[[_Ctx, re.Match[str]], Awaitable[Response]]
    role: str | None  # None: no session needed (sign-in, static files)
    form: bool = True  # a POST's body is a form (else: the upload's file)
    max_form: int = MAX_FORM  # the largest form body the page reads


@dataclass(slots=True)
class _Ctx:
    request: Request
    lang: str
    session: Session | None
    principal: Principal | None
    csrf: str  # the session's CSRF token, for the page's forms
    secure: bool
    form: dict[str, str] = field(default_factory=dict)  # a form change's fields, once checked


CODE_MESSAGES: Final = (
    # The meanings of the status codes (spec §6.7.1, protocol.code_texts), marked for the
    # catalogue so that the console shows them in the reader's language. The Chinese texts are
    # this project's translations: the spec does not give OneNET's console wording.
    # test_console's catalogue test checks this list against protocol.code_texts.
    N_("package downloaded"),
    N_("download failed: not enough space"),
    N_("download failed: out of memory"),
    N_("download failed: request timed out"),
    N_("download failed: battery too low"),
    N_("download failed: signal too weak"),
    N_("download failed: other error"),
    N_("upgrade succeeded"),
    N_("upgrade failed: battery too low"),
    N_("upgrade failed: out of memory"),
    N_("upgrade failed: package version ≠ task target"),
    N_("upgrade failed: MD5 check failed"),
    N_("upgrade failed: other error"),
    N_("upgrade failed: retry limit reached"),
    N_("upgrade failed: device upgrade expired"),
)


def _status_text(translations: NullTranslations, code: int | None) -> str:
    """``205 upgrade failed: MD5 check failed`` in the page's language; a value that is not a
    status code shows as the bare number."""
    if code is None:
        return ""
    text = code_text(code)
    return str(code) if text is None else f"{code} {translations.gettext(text)}"


class Console:
    """The ``/console`` handler.

    ``service`` is the management API's service (reads); ``api`` its dispatcher (changes);
    ``tokens`` the token store that signs operators in; ``sessions`` the cookie codec;
    ``secure`` whether the listener uses TLS (then cookies are ``Secure``).
    """

    def __init__(
        self,
        service: svc.AdminService,
        api: AdminApi,
        tokens: TokenDirectory,
        sessions: SessionCodec,
        *,
        secure: bool = False,
        max_upload_bytes: int = 0,
    ) -> None:
        self.service = service
        self._api = api
        self._tokens = tokens
        self._sessions = sessions
        self._secure = secure
        self._max_upload = max_upload_bytes
        self._translations = i18n.load_translations()
        self._envs = {code: self._environment(t) for code, t in self._translations.items()}
        self._static = self._load_static()
        self.live: LiveHub[int, dict[str, Any]] = LiveHub(self._task_live)
        self.campaign_live: LiveHub[int, dict[str, Any]] = LiveHub(self._campaign_live)
        self._pages = self._page_table()

    # ------------------------------------------------------------------ set-up

    @staticmethod
    def _environment(translations: NullTranslations) -> jinja2.Environment:
        env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(_HERE / "templates"),
            autoescape=True,  # every value shown is escaped: a `<script>` name stays text
            extensions=["jinja2.ext.i18n"],
            undefined=jinja2.StrictUndefined,
            auto_reload=False,
        )
        env.install_gettext_translations(translations, newstyle=True)  # type: ignore[attr-defined]
        env.filters["status"] = lambda code: _status_text(translations, code)
        env.filters["label"] = lambda value: translations.gettext(LABELS.get(value, value))
        env.filters["when"] = lambda t: (
            "" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(int(t)))
        )
        env.filters["when_ms"] = lambda ms: (
            "" if ms is None else env.filters["when"](ms // 1000) + f".{int(ms) % 1000:03d}"
        )
        return env

    @staticmethod
    def _load_static() -> dict[str, tuple[bytes, str, str]]:
        # A fixed, small set of files: read once, served from memory with a content ETag.
        files: dict[str, tuple[bytes, str, str]] = {}
        for path in sorted(_STATIC.iterdir()):
            if not path.is_file():
                continue
            data = path.read_bytes()
            kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            if kind.startswith("text/") or kind.endswith("javascript"):
                kind += "; charset=utf-8"
            etag = '"' + hashlib.sha256(data).hexdigest()[:20] + '"'
            files[path.name] = (data, kind, etag)
        return files

    def _page_table(self) -> list[_Page]:
        def page(
            method: str,
            pattern: str,
            handler: Callable[[_Ctx, re.Match[str]], Awaitable[Response]],
            role: str | None = "viewer",
            *,
            form: bool = True,
            max_form: int = MAX_FORM,
        ) -> _Page:
            return _Page(method, re.compile(pattern + r"\Z"), handler, role, form, max_form)

        return [
            page("GET", r"/static/(?P<name>[A-Za-z0-9._-]+)", self._static_file, None),
            page("GET", r"/login", self._login_form, None),
            page("POST", r"/login", self._login, None),
            page("POST", r"/logout", self._logout, None),
            page("POST", r"/lang", self._set_lang, None),
            page("GET", r"/?", self._overview),
            page("GET", r"/devices", self._devices),
            page("GET", r"/devices/(?P<dev_id>[1-9][0-9]{0,18})", self._device),
            page("GET", r"/packages", self._packages),
            page("POST", r"/packages/upload", self._upload, "operator", form=False),
            page(
                "POST",
                r"/packages/(?P<id>[1-9][0-9]{0,9})/delete",
                self._delete_package,
                "operator",
            ),
            page("GET", r"/tasks", self._tasks),
            page("GET", r"/tasks/(?P<id>[1-9][0-9]{0,9})", self._task),
            page("GET", r"/tasks/(?P<id>[1-9][0-9]{0,9})/events", self._task_events),
            page(
                "POST",
                r"/tasks/(?P<id>[1-9][0-9]{0,9})/(?P<action>pause|resume|cancel)",
                self._task_action,
                "operator",
            ),
            page("GET", r"/campaigns", self._campaigns),
            page("GET", r"/campaigns/new", self._campaign_form, "operator"),
            page("POST", r"/campaigns/preview", self._campaign_preview, "operator",
                 max_form=MAX_CAMPAIGN_FORM),
            page("POST", r"/campaigns/create", self._campaign_create, "operator",
                 max_form=MAX_CAMPAIGN_FORM),
            page("GET", r"/campaigns/(?P<id>[1-9][0-9]{0,9})", self._campaign),
            page("GET", r"/campaigns/(?P<id>[1-9][0-9]{0,9})/events", self._campaign_events),
            page(
                "POST",
                r"/campaigns/(?P<id>[1-9][0-9]{0,9})/(?P<action>" + _ACTION_PATTERN + ")",
                self._campaign_action,
                "operator",
            ),
            page("POST", r"/campaigns/(?P<id>[1-9][0-9]{0,9})/devices",
                 self._campaign_add_devices, "operator", max_form=MAX_CAMPAIGN_FORM),
            page("GET", r"/products", self._products),
            page("GET", rf"/products/(?P<pid>{_PID})", self._product),
            page(
                "POST",
                rf"/products/(?P<pid>{_PID})/(?P<action>reveal-key|rotate-key)",
                self._product_key,
                "operator",
            ),
            page("GET", r"/accounts", self._accounts),
            page("GET", rf"/accounts/(?P<uid>{_UID})", self._account),
            page(
                "POST",
                rf"/accounts/(?P<uid>{_UID})/(?P<action>reveal-key|rotate-key)",
                self._account_key,
                "operator",
            ),
            page("GET", r"/audit", self._audit_log),
            page("GET", r"/tokens", self._api_tokens, "admin"),
            page("POST", r"/tokens", self._create_token, "admin"),
            page("POST", r"/tokens/(?P<id>[1-9][0-9]{0,9})/revoke", self._revoke_token, "admin"),
        ]  # fmt: skip

    # ------------------------------------------------------------------ dispatch

    async def handle(self, request: Request) -> Response:
        """Answer one ``/console`` request; never raises, never sends a traceback."""
        ctx = self._context(request)
        try:
            return await self._dispatch(ctx)
        except _Redirect as redirect:
            return self._redirect(redirect.location)
        except _Refused as refused:
            return self._render(ctx, "error.html", {"message": refused.message}, refused.status)
        except Exception:
            log.exception("console request %s %s failed", request.method, request.path)
            return self._render(ctx, "error.html", {"message": "internal error"}, 500)

    def _context(self, request: Request) -> _Ctx:
        cookies = _cookies(request)
        lang = i18n.negotiate(cookies.get(LANG_COOKIE), request.header("Accept-Language"))
        session = self._sessions.decode(cookies.get(SESSION_COOKIE))
        principal: Principal | None = None
        if session is not None:
            # Asked on every request: a revoked token's sessions end at once.
            principal = self._active(session)
            if principal is None:
                session = None
        csrf = self._sessions.csrf_token(session) if session is not None else ""
        return _Ctx(request, lang, session, principal, csrf, self._secure)

    def _active(self, session: Session) -> Principal | None:
        try:
            token_id = int(session.token_id)
        except ValueError:
            return None
        principal = self._tokens.active(token_id)
        if principal is None or principal.name != session.name or principal.role != session.role:
            return None
        return principal

    async def _dispatch(self, ctx: _Ctx) -> Response:
        request = ctx.request
        sub = request.path[len(PREFIX) :] or "/"
        method = "GET" if request.method == "HEAD" else request.method
        allowed: set[str] = set()
        for page in self._pages:
            match = page.pattern.match(sub)
            if match is None:
                continue
            if page.method != method:
                allowed.add(page.method)
                continue
            if page.role is not None:
                if ctx.principal is None:
                    if method == "GET":
                        raise _Redirect(f"{PREFIX}/login?next={quote(request.path)}")
                    raise _Refused(401, self._gettext(ctx, "Sign in first."))
                if not role_allows(ctx.principal.role, page.role):
                    raise _Refused(403, self._gettext(ctx, "Your role may not do this."))
            if method == "POST":
                await self._check_change(ctx, page)
            return await page.handler(ctx, match)
        if allowed:
            raise _Refused(405, self._gettext(ctx, "Method not allowed."))
        raise _Refused(404, self._gettext(ctx, "No such page."))

    async def _check_change(self, ctx: _Ctx, page: _Page) -> None:
        """The CSRF and origin checks of a change, before its handler runs.

        A form page's body is read here (into ``ctx.form``) and must carry the session's token
        in ``_csrf``; any other change (the package upload, whose body is the file) must carry
        it in the ``X-CSRF-Token`` header, as htmx and console.js send it.
        """
        _check_origin(ctx, self._gettext(ctx, "The request came from another site."))
        if page.role is None:  # sign-in, sign-out, language: no session to protect yet
            if page.form:
                ctx.form = await self._read_form(ctx, page.max_form)
            return
        expired = self._gettext(ctx, "The form has expired; reload the page.")
        session = ctx.session
        header = ctx.request.header("X-CSRF-Token")
        if page.form:
            ctx.form = await self._read_form(ctx, page.max_form)
            given = header if header is not None else ctx.form.get("_csrf")
        else:
            given = header
        if session is None or not self._sessions.check_csrf(session, given):
            raise _Refused(403, expired)

    async def _read_form(self, ctx: _Ctx, limit: int) -> dict[str, str]:
        request = ctx.request
        unreadable = self._gettext(ctx, "The form could not be read.")
        try:
            raw = await request.body(limit)
        except Exception as exc:
            raise _Refused(400, unreadable) from exc
        form: dict[str, str] = {}
        try:
            for key, value in parse_qsl(raw.decode("utf-8"), keep_blank_values=True):
                form.setdefault(key, value)
        except (UnicodeDecodeError, ValueError):
            raise _Refused(400, unreadable) from None
        return form

    # ------------------------------------------------------------------ rendering

    def _gettext(self, ctx: _Ctx, message: str) -> str:
        return self._translations[ctx.lang].gettext(message)

    def _render(
        self, ctx: _Ctx, template: str, values: Mapping[str, Any], status: int = 200
    ) -> Response:
        env = self._envs[ctx.lang]
        html = env.get_template(template).render(
            lang=ctx.lang,
            languages=i18n.LANGUAGES,
            principal=ctx.principal,
            csrf=ctx.csrf,
            prefix=PREFIX,
            path=ctx.request.path,
            can_operate=ctx.principal is not None and role_allows(ctx.principal.role, "operator"),
            is_admin=ctx.principal is not None and role_allows(ctx.principal.role, "admin"),
            **values,
        )
        return self._html(html, status)

    @staticmethod
    def _html(html: str, status: int = 200, extra: list[tuple[str, str]] | None = None) -> Response:
        body = html.encode("utf-8")
        headers = [
            ("Content-Type", "text/html; charset=utf-8"),
            ("Cache-Control", "no-store"),
            *_SECURITY_HEADERS,
            *(extra or []),
            ("Content-Length", str(len(body))),
        ]
        return Response(status, headers, body)

    @staticmethod
    def _redirect(location: str, extra: list[tuple[str, str]] | None = None) -> Response:
        return Response.empty(
            303, [("Location", location), ("Cache-Control", "no-store"), *(extra or [])]
        )

    def _cookie(self, name: str, value: str, *, max_age: int | None = None) -> tuple[str, str]:
        parts = [f"{name}={value}", f"Path={PREFIX}", "HttpOnly", "SameSite=Strict"]
        if max_age is not None:
            parts.append(f"Max-Age={max_age}")
        if self._secure:
            parts.append("Secure")
        return ("Set-Cookie", "; ".join(parts))

    # ------------------------------------------------------------------ pages

    async def _static_file(self, ctx: _Ctx, match: re.Match[str]) -> Response:
        found = self._static.get(match["name"])
        if found is None:
            raise _Refused(404, self._gettext(ctx, "No such page."))
        data, kind, etag = found
        headers = [
            ("Content-Type", kind),
            ("ETag", etag),
            ("Cache-Control", "no-cache"),
            ("X-Content-Type-Options", "nosniff"),
        ]
        if ctx.request.header("If-None-Match") == etag:
            return Response.empty(304, headers[1:])
        return Response(200, [*headers, ("Content-Length", str(len(data)))], data)

    async def _login_form(self, ctx: _Ctx, match: re.Match[str]) -> Response:
        return self._render(ctx, "login.html", {"error": None, "next": _safe_next(ctx)})

    async def _login(self, ctx: _Ctx, match: re.Match[str]) -> Response:
        # No session yet, so no CSRF token: SameSite=Strict and the origin check guard sign-in.
        form = ctx.form
        secret = form.get("token", "").strip()
        principal = await asyncio.to_thread(self._tokens.verify, secret) if secret else None
        if principal is None:
            log.info("console sign-in refused from %s", ctx.request.peer)
            return self._render(
                ctx,
                "login.html",
                {
                    "error": self._gettext(ctx, "That token is not valid."),
                    "next": _safe_next(ctx, form.get("next")),
                },
                401,
            )
        session = self._sessions.new(str(principal.id), principal.name, principal.role)
        log.info("console sign-in by token %r", principal.name)
        cookie = self._cookie(
            SESSION_COOKIE, self._sessions.encode(session), max_age=int(self._sessions.lifetime)
        )
        return self._redirect(_safe_next(ctx, form.get("next")), [cookie])

    async def _logout(self, ctx: _Ctx, match: re.Match[str]) -> Response:
        # A forged sign-out (another site's form) would only be a nuisance, but it is refused
        # all the same: a signed-in session must show its CSRF token.
        session = ctx.session
        if session is not None and not self._sessions.check_csrf(session, ctx.form.get("_csrf")):
            raise _Refused(403, self._gettext(ctx, "The form has expired; reload the page."))
        return self._redirect(f"{PREFIX}/login", [self._cookie(SESSION_COOKIE, "", max_age=0)])

    async def _set_lang(self, ctx: _Ctx, match: re.Match[str]) -> Response:
        # A language choice changes nothing on the server: no session or CSRF token needed.
        form = ctx.form
        lang = form.get("lang", "")
        if lang not in i18n.LANGUAGES:
            raise _Refused(400, self._gettext(ctx, "Unknown language."))
        cookie = self._cookie(LANG_COOKIE, lang, max_age=365 * 86400)
        return self._redirect(_safe_next(ctx, form.get("next")), [cookie])

    async def _overview(self, ctx: _Ctx, match: re.Match[str]) -> Response:
        overview = await asyncio.to_thread(self._overview_data)
        return self._render(ctx, "overview.html", overview)

    def _overview_data(self) -> dict[str, Any]:
        tasks = self.service.list_tasks(status="active", limit=20).items
        versions: dict[tuple[str, str], int] = {}
        failures: dict[int, int] = {}
        page = self.service.list_devices(limit=500)
        for device in page.items:
            key = (device.pid, device.f_version or "-")
            versions[key] = versions.get(key, 0) + 1
        for task in tasks:
            # The failed device tasks alone, from their index: the task's full detail would
            # count its every device again (its counts are in the list already).
            failed = self.service.list_task_devices(task.id, state="failed", limit=500)
            for dt in failed.items:
                if dt.result_code is not None:
                    failures[dt.result_code] = failures.get(dt.result_code, 0) + 1
        return {
            "tasks": tasks,
            "campaigns": self._active_campaigns(),
            "versions": sorted(versions.items()),
            "versions_partial": page.next is not None,
            "failures": sorted(failures.items(), key=lambda kv: -kv[1]),
        }

    async def _devices(self, ctx: _Ctx, match: re.Match[str]) -> Response:
        q = ctx.request.query
        filters = {k: q.get(k, "").strip() for k in ("pid", "version", "q", "state", "label")}
        try:
            page = await asyncio.to_thread(
                self.service.list_devices,
                pid=filters["pid"] or None,
                f_version=filters["version"] or None,
                name_contains=filters["q"] or None,
                labels=self._label_filter(ctx, filters["label"]),
                state=filters["state"] or None,
                after=q.get("after") or None,
                limit=50,
            )
        except svc.AdminError as exc:
            raise _Refused(422, str(exc)) from None
        return self._render(
            ctx,
            "devices.html",
            {
                "devices": page.items,
                "next": page.next,
                "filters": filters,
                "next_query": urlencode({**filters, "after": page.next or ""}),
                "states": svc.DEVICE_STATES,
            },
        )

    async def _device(self, ctx: _Ctx, match: re.Match[str]) -> Response:
        dev_id = int(match["dev_id"])
        try:
            if dev_id > svc.DEV_ID_MAX:
                raise svc.NotFound("no such device")
            device = await asyncio.to_thread(self.service.get_device, dev_id)
            timeline = await asyncio.to_thread(
                self.service.device_history,
                dev_id,
                after=ctx.request.query.get("after") or None,
                limit=TIMELINE_PAGE,
            )
        except svc.NotFound:
            raise _Refused(404, self._gettext(ctx, "No such device.")) from None
        except svc.AdminError as exc:  # a malformed ?after= cursor
            raise _Refused(422, str(exc)) from None
        return self._render(
            ctx,
            "device.html",
            {"device": device, "timeline": timeline.items, "timeline_next": timeline.next},
        )

    async def _packages(self, ctx: _Ctx, match: re.Match[str]) -> Response:
        page = await asyncio.to_thread(
            self.service.list_packages, after=ctx.request.query.get("after") or None, limit=50
        )
        products = await asyncio.to_thread(self.service.list_products, limit=200)
        return self._render(
            ctx,
            "packages.html",
            {
                "packages": page.items,
                "next": page.next,
                "products": products.items,
                "max_upload": self._max_upload,
            },
        )

    async def _upload(self, ctx: _Ctx, match: re.Match[str]) -> Response:
        # The file is the body (sent by console.js with upload progress); its description is
        # the query, exactly as the management API's upload takes them.
        request = ctx.request
        query = {k: v for k, v in request.query.items() if k != "_csrf"}
        forwarded = _forward(request, "POST", "/packages", query)
        response = await self._api.handle_signed_in(forwarded, self._who(ctx))
        return _json_passthrough(response)

    async def _delete_package(self, ctx: _Ctx, match: re.Match[str]) -> Response:
        response = await self._api.handle_signed_in(
            _internal(ctx.request, "DELETE", f"/packages/{match['id']}"), self._who(ctx)
        )
        self._raise_for(ctx, response)
        raise _Redirect(f"{PREFIX}/packages")

    async def _tasks(self, ctx: _Ctx, match: re.Match[str]) -> Response:
        page = await asyncio.to_thread(
            self.service.list_tasks, after=ctx.request.query.get("after") or None, limit=50
        )
        return self._render(ctx, "tasks.html", {"tasks": page.items, "next": page.next})

    async def _task(self, ctx: _Ctx, match: re.Match[str]) -> Response:
        task_id = int(match["id"])
        try:
            task = await asyncio.to_thread(self.service.get_task, task_id)
            devices = await asyncio.to_thread(
                self._devices_of, task_id, ctx.request.query.get("after") or None
            )
        except svc.NotFound:
            raise _Refused(404, self._gettext(ctx, "No such task.")) from None
        return self._render(ctx, "task.html", {"task": task, "counts": _counts(task), **devices})

    def _devices_of(self, task_id: int, after: str | None) -> dict[str, Any]:
        page = self.service.list_task_devices(task_id, after=after, limit=100)
        failed = self.service.list_task_devices(task_id, state="failed", limit=500)
        reasons: dict[int | None, list[svc.DeviceTaskView]] = {}
        for device in failed.items:
            reasons.setdefault(device.result_code, []).append(device)
        return {
            "devices": page.items,
            "devices_next": page.next,
            "reasons": sorted(reasons.items(), key=lambda kv: (-len(kv[1]), kv[0] or 0)),
            "reasons_partial": failed.next is not None,
        }

    async def _task_live(self, task_id: int) -> dict[str, Any]:
        def read() -> dict[str, Any]:
            task = self.service.get_task(task_id)
            return {"counts": _counts(task), "devices": self._devices_of(task_id, None)}

        return await asyncio.to_thread(read)

    async def _task_events(self, ctx: _Ctx, match: re.Match[str]) -> Response:
        task_id = int(match["id"])
        try:
            await asyncio.to_thread(self.service.get_task, task_id)
        except svc.NotFound:
            raise _Refused(404, self._gettext(ctx, "No such task.")) from None
        env = self._envs[ctx.lang]
        fragments = {
            "counts": env.get_template("_task_counts.html"),
            "devices": env.get_template("_task_devices.html"),
        }

        async def events() -> AsyncIterator[bytes]:
            yield b"retry: 1000\n\n"
            async for value in self.live.watch(task_id, lifetime=STREAM_LIFETIME):
                if value is None:
                    yield b""  # lets the HTTP layer notice a gone client or a stopping server
                    continue
                for event, fragment in fragments.items():
                    html = fragment.render(
                        counts=value["counts"],
                        task_id=task_id,
                        prefix=PREFIX,
                        **value["devices"],
                    )
                    data = "".join(f"data: {line}\n" for line in html.splitlines())
                    yield f"event: {event}\n{data}\n".encode()

        headers = [
            ("Content-Type", "text/event-stream; charset=utf-8"),
            ("Cache-Control", "no-store"),
            ("X-Content-Type-Options", "nosniff"),
        ]
        return Response(200, headers, Stream(events()))

    async def _task_action(self, ctx: _Ctx, match: re.Match[str]) -> Response:
        task_id = match["id"]
        response = await self._api.handle_signed_in(
            _internal(ctx.request, "POST", f"/tasks/{task_id}/{match['action']}"), self._who(ctx)
        )
        self._raise_for(ctx, response)
        raise _Redirect(f"{PREFIX}/tasks/{task_id}")

    # ------------------------------------------------------------------ campaigns

    async def _campaigns(self, ctx: _Ctx, match: re.Match[str]) -> Response:
        q = ctx.request.query
        state = q.get("state") or None
        if state is not None and state not in CAMPAIGN_STATES:
            raise _Refused(422, self._gettext(ctx, "Unknown campaign state."))
        after = q.get("after") or ""
        if after and not (after.isdigit() and len(after) <= 10):
            raise _Refused(422, self._gettext(ctx, "The page link is not valid."))

        def read() -> dict[str, Any]:
            page = self._api.campaigns.list_campaigns(
                state=state, after=int(after) if after else None, limit=CAMPAIGN_PAGE
            )
            rows = [self._campaign_row(c.id) for c in page.items]
            return {"campaigns": rows, "next": page.next}

        listed = await asyncio.to_thread(read)
        return self._render(
            ctx, "campaigns.html", {**listed, "state": state or "", "states": CAMPAIGN_STATES}
        )

    def _campaign_row(self, campaign_id: int) -> dict[str, Any]:
        detail = self._api.campaigns.get(campaign_id)
        return {"campaign": detail, "bars": _stage_bars(detail)}

    def _active_campaigns(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        for state in ("running", "paused"):
            page = self._api.campaigns.list_campaigns(state=state, limit=CAMPAIGN_PAGE)
            found += [self._campaign_row(c.id) for c in page.items]
        return sorted(found, key=lambda row: row["campaign"].id)

    async def _campaign_form(self, ctx: _Ctx, match: re.Match[str]) -> Response:
        return await self._render_campaign_form(ctx, _FORM_DEFAULTS)

    async def _render_campaign_form(
        self,
        ctx: _Ctx,
        form: Mapping[str, str],
        *,
        preview: dict[str, Any] | None = None,
        error: str | None = None,
        status: int = 200,
    ) -> Response:
        packages = await asyncio.to_thread(self.service.list_packages, limit=200)
        return self._render(
            ctx,
            "campaign_new.html",
            {
                "form": form,
                "packages": packages.items,
                "stage_rows": range(1, STAGE_ROWS + 1),
                "preview": preview,
                "error": error,
            },
            status,
        )

    async def _campaign_preview(self, ctx: _Ctx, match: re.Match[str]) -> Response:
        return await self._campaign_submit(ctx, "/campaigns/preview")

    async def _campaign_create(self, ctx: _Ctx, match: re.Match[str]) -> Response:
        return await self._campaign_submit(ctx, "/campaigns")

    async def _campaign_submit(self, ctx: _Ctx, api_path: str) -> Response:
        """The form, checked for shape here and for meaning by the API: its dry run (shown
        under the form) or its creation (then the new campaign's page)."""
        form = {k: v for k, v in ctx.form.items() if k != "_csrf"}
        try:
            spec = _campaign_spec(form, self._translations[ctx.lang].gettext)
        except _FormInvalid as exc:
            return await self._render_campaign_form(ctx, form, error=str(exc), status=422)
        body = json.dumps(spec).encode()
        response = await self._api.handle_signed_in(
            _internal(ctx.request, "POST", api_path, body=body), self._who(ctx)
        )
        if response.status >= 500:
            self._raise_for(ctx, response)
        if response.status >= 300:
            message = _api_message(response) or self._gettext(ctx, "The action failed.")
            return await self._render_campaign_form(
                ctx, form, error=message, status=response.status
            )
        assert isinstance(response.body, bytes)
        answer = json.loads(response.body)
        if api_path == "/campaigns":
            raise _Redirect(f"{PREFIX}/campaigns/{int(answer['id'])}")
        return await self._render_campaign_form(ctx, form, preview=answer)

    async def _campaign(self, ctx: _Ctx, match: re.Match[str]) -> Response:
        campaign_id = int(match["id"])
        try:
            value = await self._campaign_live(campaign_id)
            preview = None
            if value["campaign"].state == "draft":  # who each stage takes, before it goes live
                preview = await asyncio.to_thread(self._api.campaigns.preview_campaign, campaign_id)
        except svc.NotFound:
            raise _Refused(404, self._gettext(ctx, "No such campaign.")) from None
        return self._render(ctx, "campaign.html", {**value, "preview": preview})

    async def _campaign_live(self, campaign_id: int) -> dict[str, Any]:
        """What the campaign page shows, aggregated per stage and failure reason: one read of
        the campaign's counters (a GROUP BY) and of its failed members, however many devices
        reported since the last one."""

        def read() -> dict[str, Any]:
            detail = self._api.campaigns.get(campaign_id)
            failed, partial = self._api.campaigns.failures(campaign_id, limit=FAILURES_SHOWN)
            reasons: dict[int | None, list[camp.FailedMember]] = {}
            for member in failed:
                reasons.setdefault(member.result_code, []).append(member)
            return {
                "campaign": detail,
                "bars": _stage_bars(detail),
                "actions": [
                    a
                    for a in CAMPAIGN_ACTIONS
                    if action_refusal(_ENGINE_ACTION[a], detail.state) is None
                ],
                "reasons": sorted(reasons.items(), key=lambda kv: (-len(kv[1]), kv[0] or 0)),
                "reasons_partial": partial,
            }

        return await asyncio.to_thread(read)

    async def _campaign_events(self, ctx: _Ctx, match: re.Match[str]) -> Response:
        campaign_id = int(match["id"])
        try:
            await asyncio.to_thread(self._api.campaigns.get, campaign_id)
        except svc.NotFound:
            raise _Refused(404, self._gettext(ctx, "No such campaign.")) from None
        env = self._envs[ctx.lang]
        fragments = {
            "campaign": env.get_template("_campaign_stages.html"),
            "failures": env.get_template("_campaign_failures.html"),
        }
        page_values = {
            "prefix": PREFIX,
            "csrf": ctx.csrf,
            "can_operate": ctx.principal is not None
            and role_allows(ctx.principal.role, "operator"),
        }

        async def events() -> AsyncIterator[bytes]:
            yield b"retry: 1000\n\n"
            async for value in self.campaign_live.watch(campaign_id, lifetime=STREAM_LIFETIME):
                if value is None:
                    yield b""  # lets the HTTP layer notice a gone client or a stopping server
                    continue
                for event, fragment in fragments.items():
                    html = fragment.render(**page_values, **value)
                    data = "".join(f"data: {line}\n" for line in html.splitlines())
                    yield f"event: {event}\n{data}\n".encode()

        headers = [
            ("Content-Type", "text/event-stream; charset=utf-8"),
            ("Cache-Control", "no-store"),
            ("X-Content-Type-Options", "nosniff"),
        ]
        return Response(200, headers, Stream(events()))

    async def _campaign_action(self, ctx: _Ctx, match: re.Match[str]) -> Response:
        await self._act_on_campaign(ctx, match["id"], match["action"])
        raise _Redirect(f"{PREFIX}/campaigns/{match['id']}")

    async def _campaign_add_devices(self, ctx: _Ctx, match: re.Match[str]) -> Response:
        """Devices listed by ID join the campaign (the API's ``POST /campaigns/{id}/devices``:
        a running campaign activates them up to its stage's share)."""
        try:
            dev_ids = _dev_ids(ctx.form.get("dev_ids", ""), self._translations[ctx.lang].gettext)
        except _FormInvalid as exc:
            raise _Refused(422, str(exc)) from None
        body = json.dumps({"dev_ids": dev_ids}).encode()
        await self._act_on_campaign(ctx, match["id"], "devices", body=body)
        raise _Redirect(f"{PREFIX}/campaigns/{match['id']}")

    async def _act_on_campaign(
        self, ctx: _Ctx, campaign_id: str, action: str, *, body: bytes = b""
    ) -> None:
        # The version the operator saw: the API refuses the action if the campaign moved on
        # meanwhile (another operator, an automatic decision), rather than apply it blind.
        version = ctx.form.get("version", "")
        query = {"if_version": version} if version.isdigit() and len(version) <= 9 else {}
        path = f"/campaigns/{campaign_id}/{action}"
        response = await self._api.handle_signed_in(
            _internal(ctx.request, "POST", path, body=body, query=query), self._who(ctx)
        )
        self._raise_for(ctx, response)

    @staticmethod
    def _who(ctx: _Ctx) -> Principal:
        assert ctx.principal is not None  # the page table let only signed-in callers here
        return ctx.principal

    def _raise_for(self, ctx: _Ctx, response: Response) -> None:
        if response.status < 300:
            return
        message = _api_message(response) or self._gettext(ctx, "The action failed.")
        # The API's own answer, shown as it is: the console adds no rules (and a 5xx of the
        # API stays a 5xx: it is the server's fault, not the operator's).
        raise _Refused(response.status, message)

    # ------------------------------------------------------------------ keys, audit, tokens

    async def _read(self, ctx: _Ctx, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn`` of the service off the event loop; its refusals as pages (404, 422)."""
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except svc.NotFound as exc:
            raise _Refused(404, str(exc)) from None
        except svc.AdminError as exc:
            raise _Refused(422, str(exc)) from None

    async def _api_model(
        self,
        ctx: _Ctx,
        method: str,
        path: str,
        model: type[M],
        *,
        body: bytes = b"",
        query: Mapping[str, str] | None = None,
    ) -> M:
        """The management API's answer to ``method path`` for the signed-in token, as
        ``model``; a refusal is shown as the API words it (its role checks included)."""
        request = _internal(ctx.request, method, path, body=body, query=query)
        response = await self._api.handle_signed_in(request, self._who(ctx))
        self._raise_for(ctx, response)
        assert isinstance(response.body, bytes)  # the API's JSON answers are bytes
        return model.model_validate_json(response.body)

    def _label_filter(self, ctx: _Ctx, text: str) -> list[tuple[str, str]]:
        pairs: list[tuple[str, str]] = []
        for part in filter(None, (p.strip() for p in text.split(","))):
            pair = svc.parse_label(part)
            if pair is None:
                message = self._gettext(
                    ctx, "A label filter is key=value, several separated by commas: %(label)s"
                )
                raise _Refused(422, message % {"label": part})
            pairs.append(pair)
        return pairs

    async def _products(self, ctx: _Ctx, match: re.Match[str]) -> Response:
        after = ctx.request.query.get("after") or None
        page = await self._read(ctx, self.service.list_products, after=after, limit=50)
        return self._render(ctx, "products.html", {"products": page.items, "next": page.next})

    async def _product(self, ctx: _Ctx, match: re.Match[str], key: str | None = None) -> Response:
        # The key is shown only after an audited reveal (or a rotation, audited itself).
        product: svc.Product = await self._read(ctx, self.service.get_product, match["pid"])
        return self._render(ctx, "product.html", {"product": product, "key": key})

    async def _product_key(self, ctx: _Ctx, match: re.Match[str]) -> Response:
        # reveal-key and rotate-key are the API's, audited there under the signed-in token.
        path = f"/products/{match['pid']}/{match['action']}"
        product = await self._api_model(ctx, "POST", path, svc.Product)
        return await self._product(ctx, match, product.access_key)

    async def _accounts(self, ctx: _Ctx, match: re.Match[str]) -> Response:
        after = ctx.request.query.get("after") or None
        page = await self._read(ctx, self.service.list_accounts, after=after, limit=50)
        return self._render(ctx, "accounts.html", {"accounts": page.items, "next": page.next})

    async def _account(self, ctx: _Ctx, match: re.Match[str], key: str | None = None) -> Response:
        account: svc.Account = await self._read(ctx, self.service.get_account, match["uid"])
        return self._render(ctx, "account.html", {"account": account, "key": key})

    async def _account_key(self, ctx: _Ctx, match: re.Match[str]) -> Response:
        path = f"/accounts/{match['uid']}/{match['action']}"
        account = await self._api_model(ctx, "POST", path, svc.Account)
        return await self._account(ctx, match, account.access_key)

    async def _audit_log(self, ctx: _Ctx, match: re.Match[str]) -> Response:
        q = ctx.request.query
        filters = {k: q.get(k, "").strip() for k in ("actor", "action", "target", "since", "until")}
        query = {k: v for k, v in filters.items() if v and k not in ("since", "until")}
        for name, end_of_day in (("since", False), ("until", True)):
            if filters[name]:
                query[name] = str(self._day(ctx, filters[name], end_of_day))
        query["limit"] = "50"
        query["after"] = q.get("after") or ""
        page = await self._api_model(ctx, "GET", "/audit", audit.AuditPage, query=query)
        entries = [
            {"entry": e, "before": _compact(e.before), "after": _compact(e.after)}
            for e in page.items
        ]
        return self._render(
            ctx,
            "audit.html",
            {
                "entries": entries,
                "filters": filters,
                "next": page.next,
                "next_query": urlencode({**filters, "after": page.next or ""}),
            },
        )

    def _day(self, ctx: _Ctx, text: str, end_of_day: bool) -> int:
        """``YYYY-MM-DD`` (UTC, as the pages show times) as Unix seconds: its first second, or
        its last with ``end_of_day``."""
        try:
            day = time.strptime(text, "%Y-%m-%d")
        except ValueError:
            message = self._gettext(ctx, "A date is written YYYY-MM-DD: %(date)s")
            raise _Refused(422, message % {"date": text}) from None
        start = calendar.timegm(day)
        return start + 86399 if end_of_day else start

    async def _api_tokens(
        self, ctx: _Ctx, match: re.Match[str], created: ApiTokenCreated | None = None
    ) -> Response:
        after = ctx.request.query.get("after") or ""
        page = await self._api_model(ctx, "GET", "/tokens", ApiTokenPage, query={"after": after})
        return self._render(
            ctx,
            "tokens.html",
            {"tokens": page.items, "next": page.next, "created": created, "roles": ROLES},
        )

    async def _create_token(self, ctx: _Ctx, match: re.Match[str]) -> Response:
        form = ctx.form
        body = json.dumps({"name": form.get("name", "").strip(), "role": form.get("role", "")})
        created = await self._api_model(ctx, "POST", "/tokens", ApiTokenCreated, body=body.encode())
        # The secret is in this answer only (no-store): the platform keeps its hash alone.
        return await self._api_tokens(ctx, match, created)

    async def _revoke_token(self, ctx: _Ctx, match: re.Match[str]) -> Response:
        response = await self._api.handle_signed_in(
            _internal(ctx.request, "DELETE", f"/tokens/{match['id']}"), self._who(ctx)
        )
        self._raise_for(ctx, response)
        raise _Redirect(f"{PREFIX}/tokens")


def _compact(state: Mapping[str, Any] | None) -> str:
    # An audit entry's before/after on one line; the log redacted its secrets already.
    if state is None:
        return ""
    return json.dumps(state, ensure_ascii=False, separators=(", ", ": "), sort_keys=True)


# ---- campaigns: the form's shape and the stage bars (the rules are the API's)

CAMPAIGN_STATES: Final = ("draft", "running", "paused", "finished", "aborted")
CAMPAIGN_ACTIONS: Final = ("start", "pause", "resume", "advance", "abort", "retry-failed")
_ENGINE_ACTION: Final = {a: a.replace("-", "_") for a in CAMPAIGN_ACTIONS}
_ACTION_PATTERN: Final = "|".join(CAMPAIGN_ACTIONS)
CAMPAIGN_PAGE: Final = 20
FAILURES_SHOWN: Final = 500
TIMELINE_PAGE: Final = 100
STAGE_ROWS: Final = 5
"""Stage rows of the create form (the API allows more; the console's form stays one screen)."""

_FORM_DEFAULTS: Final[Mapping[str, str]] = {
    "selector": "filter",
    **{f"s{n}_{k}": v for n in (1, 2, 3) for k, v in (("min", "0"), ("success", "95"))},
    **{f"s{n}_on_failure": "pause" for n in range(1, STAGE_ROWS + 1)},
    "s1_share": "10%",
    "s1_soak": "600",
    "s1_ceiling": "10%",
    "s2_share": "50%",
    "s2_soak": "600",
    "s2_ceiling": "10%",
    "s3_share": "rest",
    "s3_soak": "0",
    **dict.fromkeys(("signal", "power", "retry", "interval"), "0"),
}
_WHOLE: Final = re.compile(r"-?[0-9]{1,12}\Z")


class _FormInvalid(Exception):
    """A form field that is not of the shape the API takes; the message is translated."""


def _number(text: str, message: str, *, whole: bool = True) -> int | float:
    if whole:
        if not _WHOLE.match(text):
            raise _FormInvalid(message)
        return int(text)
    try:
        value = float(text)
    except ValueError:
        raise _FormInvalid(message) from None
    if not math.isfinite(value):
        raise _FormInvalid(message)
    return value


def _share(
    text: str, message: str, *, percent: str, count: str, rest: str | None = None
) -> dict[str, Any]:
    """``10%`` (a percent), ``100`` (a number of devices) or, where allowed, ``rest``."""
    if rest is not None and text.lower() in ("rest", "剩余"):
        return {rest: True}
    if text.endswith("%"):
        return {percent: _number(text[:-1].strip(), message, whole=False)}
    return {count: _number(text, message)}


def _campaign_spec(form: Mapping[str, str], _: Callable[[str], str]) -> dict[str, Any]:
    """The form as the management API's campaign (``CampaignCreate``), or :class:`_FormInvalid`
    for a field that cannot be put in it. What the values mean is the API's to check."""
    package = form.get("package_id", "").strip()
    if not (package.isdigit() and len(package) <= 10):
        raise _FormInvalid(_("Choose a package."))
    selector: dict[str, Any] = {}
    if form.get("selector") == "devices":
        selector["dev_ids"] = _dev_ids(form.get("dev_ids", ""), _)
    else:
        versions = [v.strip() for v in form.get("from_versions", "").split(",") if v.strip()]
        if versions:
            selector["from_versions"] = versions
        labels: dict[str, str] = {}
        for part in form.get("labels", "").split(","):
            if not part.strip():
                continue
            key, sep, value = part.partition("=")
            if not sep or not key.strip():
                raise _FormInvalid(_("Labels are key=value pairs separated by commas."))
            labels[key.strip()] = value.strip()
        if labels:
            selector["labels"] = labels
    stages: list[dict[str, Any]] = []
    for n in range(1, STAGE_ROWS + 1):
        share = form.get(f"s{n}_share", "").strip()
        if not share:
            continue
        bad = _("Stage %(n)d: “%(value)s” is not a number.")

        def field(name: str, *, whole: bool = True, n: int = n, bad: str = bad) -> Any:
            text = form.get(f"s{n}_{name}", "").strip()
            return None if not text else _number(text, bad % {"n": n, "value": text}, whole=whole)

        shape = _(
            "Stage %(n)d: the share is a cumulative percent (10%%), a number of devices (100) "
            "or “rest”."
        )
        stage: dict[str, Any] = _share(
            share, shape % {"n": n}, percent="percent", count="count", rest="rest"
        )
        ceiling = form.get(f"s{n}_ceiling", "").strip()
        if ceiling:
            shape = _("Stage %(n)d: the failure ceiling is a percent (10%%) or a number (5).")
            stage |= _share(
                ceiling, shape % {"n": n}, percent="max_failed_percent", count="max_failed"
            )
        for name, key, whole in (
            ("soak", "soak_s", True),
            ("min", "min_executed", True),
            ("success", "success_percent", False),
        ):
            value = field(name, whole=whole)
            if value is not None:
                stage[key] = value
        if form.get(f"s{n}_on_failure") == "abort":
            stage["on_failure"] = "abort"
        stages.append(stage)
    if not stages:
        raise _FormInvalid(_("Give at least one stage."))
    spec: dict[str, Any] = {
        "name": form.get("name", "").strip(),
        "package_id": int(package),
        "selector": selector,
        "stages": stages,
    }
    for name in ("signal", "power", "retry", "interval"):
        text = form.get(name, "").strip() or "0"
        spec[name] = _number(text, _("“%(value)s” is not a whole number.") % {"value": text})
    for name in ("start_time", "deadline"):
        text = form.get(name, "").strip()
        if text:
            spec[name] = _utc_minute(text, _)
    rate = form.get("per_minute", "").strip()
    if rate:
        message = _("The dispatch rate “%(value)s” is not a number of devices per minute.")
        spec["rate"] = {"per_minute": _number(rate, message % {"value": rate}, whole=False)}
    if form.get("dynamic") == "on":
        spec["dynamic"] = True
    return spec


def _dev_ids(text: str, _: Callable[[str], str]) -> list[int]:
    """Device IDs separated by spaces, commas or lines, or :class:`_FormInvalid`."""
    ids = text.replace(",", " ").split()
    if not ids or not all(i.isdigit() and len(i) <= 19 for i in ids):
        raise _FormInvalid(_("List the devices by ID, separated by spaces or commas."))
    return [int(i) for i in ids]


def _utc_minute(text: str, _: Callable[[str], str]) -> int:
    """A browser's ``datetime-local`` value (``YYYY-MM-DDTHH:MM``, seconds optional), read as
    UTC as every page shows times, as Unix seconds; or :class:`_FormInvalid`."""
    for shape in ("%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M"):
        try:
            return calendar.timegm(time.strptime(text, shape))
        except ValueError:
            continue
    message = _("“%(value)s” is not a date and time (YYYY-MM-DD HH:MM, UTC).")
    raise _FormInvalid(message % {"value": text})


def _stage_bars(detail: CampaignDetail) -> list[dict[str, int]]:
    """Each stage's bar widths (multiples of 5, as the stylesheet's classes), over the devices
    it covers: succeeded, failed with a package failure, failed otherwise."""
    bars = []
    for stage in detail.stages:
        counts = stage.counts
        whole = max(stage.planned, counts.get("targeted", 0), 1)

        def width(n: int, whole: int = whole) -> int:
            return min(100, round(20 * n / whole) * 5)

        bars.append(
            {
                "ok": width(counts.get("succeeded", 0)),
                "bad": width(counts.get("failed_package", 0)),
                "other": width(counts.get("failed_environment", 0)),
            }
        )
    return bars


def _counts(task: svc.Task) -> dict[str, Any]:
    counts = task.counts.model_dump()
    total = max(task.total, 1)
    succeeded = counts.get("succeeded", 0)
    failed = counts.get("failed", 0)
    return {
        "states": counts,
        "succeeded_pct": round(100 * succeeded / total, 1),
        "failed_pct": round(100 * failed / total, 1),
        "done_pct": round(100 * (succeeded + failed + counts.get("cancelled", 0)) / total, 1),
    }


def _cookies(request: Request) -> dict[str, str]:
    raw = request.header("Cookie")
    if not raw or len(raw) > 4096:
        return {}
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(raw)
    except Exception:  # a malformed cookie header is as good as none
        return {}
    return {key: morsel.value for key, morsel in jar.items()}


def _check_origin(ctx: _Ctx, message: str) -> None:
    # Browsers send Origin on every POST; one naming another host is a cross-site request.
    origin = ctx.request.header("Origin")
    if origin is None or origin == "null":
        return
    host = ctx.request.header("Host") or ""
    if origin.split("://", 1)[-1] != host:
        raise _Refused(403, message)


def _safe_next(ctx: _Ctx, given: str | None = None) -> str:
    target = given if given is not None else ctx.request.query.get("next", "")
    # Only a path of this console: never an open redirect to another site.
    if target.startswith(PREFIX) and not target.startswith("//") and "\\" not in target:
        return target
    return f"{PREFIX}/"


def _internal(
    request: Request,
    method: str,
    path: str,
    *,
    body: bytes = b"",
    query: Mapping[str, str] | None = None,
) -> Request:
    sent = False

    async def read() -> bytes:
        nonlocal sent
        if sent:
            return b""
        sent = True
        return body

    qs = urlencode(dict(query or {}))
    return Request(
        method=method,
        target=API + path + (f"?{qs}" if qs else ""),
        path=API + path,
        query_string=qs,
        headers=[("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
        peer=request.peer,
        _read_chunk=read,
        content_length=len(body),
    )


def _forward(request: Request, method: str, path: str, query: Mapping[str, str]) -> Request:
    qs = urlencode(dict(query))
    return Request(
        method=method,
        target=API + path + (f"?{qs}" if qs else ""),
        path=API + path,
        query_string=qs,
        headers=[
            h
            for h in request.headers
            if h[0].lower() in ("content-length", "transfer-encoding", "content-type")
        ],
        peer=request.peer,
        _read_chunk=request._read_chunk,
        content_length=request.content_length,
        chunked=request.chunked,
        http_version=request.http_version,
    )


def _api_message(response: Response) -> str | None:
    if not isinstance(response.body, bytes):
        return None
    try:
        return str(json.loads(response.body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return None


def _json_passthrough(response: Response) -> Response:
    # The upload's answer goes to console.js as the API gave it, with the console's headers.
    keep = [(k, v) for k, v in response.headers if k.lower() in ("content-type", "content-length")]
    return Response(
        response.status,
        [*keep, ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff")],
        response.body,
    )
