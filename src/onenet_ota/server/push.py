"""Task-push notifications (spec §11, decision D24): tell the operator's application that devices
received an upgrade task, so that it can wake them instead of waiting for their next poll.

- The URL is verified once, when configured: ``GET <url>?signature=<md5hex(token + uid)>`` must
  answer 2xx with the body ``PASSED``; otherwise nothing is pushed (and that is logged).
- Each task-creation operation sends one ``POST <url>`` with
  ``{"info":{"uid","date"},"signature","msg":{"dids","startTime","version"}}`` (dates in ms).
- 10 s timeout per attempt; any 2xx is delivered; at most 3 attempts, 30 s apart. Failures are
  logged and never affect the task: devices still poll E3.

The push token is a secret: it never appears in logs, only its signature goes on the wire.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any, Final

import httpx2

from onenet_ota.server.admin_service import CreatedTask

__all__ = ["TaskPusher", "push_signature"]

log = logging.getLogger(__name__)

TIMEOUT_S: Final = 10.0
ATTEMPTS: Final = 3
RETRY_DELAY_S: Final = 30.0


def push_signature(token: str, uid: int) -> str:
    """``md5hex(token + uid)`` (§11; vector in Appendix B.2)."""
    return hashlib.md5(f"{token}{uid}".encode(), usedforsecurity=False).hexdigest()


def _safe_url(url: str) -> str:
    # The URL may carry credentials in its query or userinfo: log only scheme, host and path.
    parsed = httpx2.URL(url)
    return f"{parsed.scheme}://{parsed.host}{parsed.path}"


class TaskPusher:
    """Sends §11 notifications to ``url``. ``client`` is injectable (tests, proxies)."""

    def __init__(
        self,
        url: str,
        token: str,
        uid: int,
        *,
        client: httpx2.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
        retry_delay: float = RETRY_DELAY_S,
    ) -> None:
        self.url = url
        self._signature = push_signature(token, uid)
        self._uid = uid
        self._client = client
        self._own_client = client is None
        self._clock = clock
        self._retry_delay = retry_delay
        self._pending: set[asyncio.Task[bool]] = set()
        self.verified = False

    def _http(self) -> httpx2.AsyncClient:
        if self._client is None:
            self._client = httpx2.AsyncClient(timeout=TIMEOUT_S, follow_redirects=False)
        return self._client

    async def verify(self) -> bool:
        """The verification GET; pushes are sent only after it succeeded."""
        try:
            response = await self._http().get(self.url, params={"signature": self._signature})
        except httpx2.HTTPError as exc:
            log.error("task push disabled: verifying %s failed: %s", _safe_url(self.url), exc)
            return False
        accepted = response.is_success and response.text.strip() == "PASSED"
        if not accepted:
            log.error(
                "task push disabled: %s answered %d without PASSED",
                _safe_url(self.url),
                response.status_code,
            )
        self.verified = accepted
        return accepted

    def body(self, created: CreatedTask) -> dict[str, Any]:
        """The notification for one task-creation operation (§11)."""
        return {
            "info": {"uid": self._uid, "date": int(self._clock() * 1000)},
            "signature": self._signature,
            "msg": {
                "dids": created.dev_ids,
                "startTime": created.task.start_time * 1000,
                "version": created.task.target,
            },
        }

    def notify(self, created: CreatedTask) -> None:
        """Schedule the push for ``created`` on the running loop; returns at once."""
        if not self.verified:
            return
        task = asyncio.get_running_loop().create_task(self.deliver(created))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def deliver(self, created: CreatedTask) -> bool:
        """POST the notification with D24's retries; True once a 2xx arrived."""
        for attempt in range(1, ATTEMPTS + 1):
            try:
                response = await self._http().post(self.url, json=self.body(created))
                if response.is_success:
                    return True
                problem = f"HTTP {response.status_code}"
            except httpx2.HTTPError as exc:
                problem = type(exc).__name__
            log.warning(
                "task push for task %d, attempt %d/%d, to %s failed: %s",
                created.task.id,
                attempt,
                ATTEMPTS,
                _safe_url(self.url),
                problem,
            )
            if attempt < ATTEMPTS:
                await asyncio.sleep(self._retry_delay)
        log.error("task push for task %d given up after %d attempts", created.task.id, ATTEMPTS)
        return False

    async def aclose(self) -> None:
        """Cancel pending pushes and close the HTTP client."""
        for task in list(self._pending):
            task.cancel()
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        if self._own_client and self._client is not None:
            await self._client.aclose()
