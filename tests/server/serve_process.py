"""``onenet-ota serve`` as a real subprocess, for the app and CLI tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ONENET_OTA = Path(sys.executable).with_name("onenet-ota")


class ServerProcess:
    """``onenet-ota serve`` in a subprocess; stderr is collected by a thread."""

    def __init__(
        self,
        data_dir: Path,
        *args: str,
        env: dict[str, str] | None = None,
        host: str | None = "127.0.0.1",
    ) -> None:
        """``host`` None leaves the address to the server's default."""
        self.data_dir = data_dir
        self.lines: list[str] = []
        self._seen = threading.Condition()
        self.process = subprocess.Popen(
            [
                str(ONENET_OTA),
                "serve",
                *(["--host", host] if host is not None else []),
                "--port",
                "0",
                "--data-dir",
                str(data_dir),
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._seen:
                self.lines.append(line)
                self._seen.notify_all()
        with self._seen:
            self._seen.notify_all()

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        regex = re.compile(pattern)
        end = time.monotonic() + timeout
        with self._seen:
            while True:
                for line in self.lines:
                    if match := regex.search(line):
                        return match
                left = end - time.monotonic()
                if left <= 0 or self.process.poll() is not None:
                    raise AssertionError(f"no {pattern!r} in server output:\n{''.join(self.lines)}")
                self._seen.wait(min(left, 0.5))

    def url(self) -> str:
        port = self.wait_for(r"listening on https?://[^:]+:(\d+)").group(1)
        return f"http://127.0.0.1:{port}"

    def stop(self, signum: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            return self.process.wait(30)
        finally:
            self._reader.join(5)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found
