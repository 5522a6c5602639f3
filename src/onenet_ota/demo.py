"""``python -m onenet_ota.demo`` (``make demo``): one complete upgrade on a throwaway platform.

1. start the real server (``onenet-ota serve``, embedded SQLite) in a temporary directory on a
   free loopback port (:class:`onenet_ota.sim.server.LocalServer`);
2. create a product, a device, a generated package and a task through the management API
   (:class:`onenet_ota.management.ManagementClient`, what ``onenet-ota admin`` uses);
3. run the device upgrade with the real command line, ``onenet-ota device upgrade``, which draws
   its progress bar on a terminal;
4. print the server's final task state, check the installed file against the package;
5. stop the server and remove the temporary directory, whatever happened.

Exit status 0 when the upgrade succeeded and the server agrees, 1 otherwise, 130 on Ctrl-C.
:func:`provision` is reused by tests and benchmarks to set up a device with a task.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from onenet_ota.management import ManagementClient, ManagementError, ProtocolError
from onenet_ota.sim.server import LocalServer, LocalServerError

__all__ = ["Provisioned", "generate_package", "main", "provision"]


@dataclass(frozen=True)
class Provisioned:
    """A device with an upgrade task, made through the management API."""

    pid: str
    access_key: str
    dev_id: int
    device_name: str
    package_id: int
    task_id: int
    module_type: str
    current: str
    target: str
    size: int
    md5: str

    def device_args(self, server: str, dialect: str = "classic") -> list[str]:
        """``onenet-ota device upgrade`` options naming this device in ``dialect`` (the key goes
        by env): classic names it by dev_id, Studio and fuse by product and name in the path."""
        named = (
            ["--dev-id", str(self.dev_id)]
            if dialect == "classic"
            else ["--dialect", dialect, "--device-name", self.device_name]
        )
        return [
            "--server",
            server,
            *named,
            "--product-id",
            self.pid,
            "--type",
            self.module_type,
            "--version",
            self.current,
        ]


def generate_package(size: int, seed: int = 2026) -> bytes:
    """Deterministic pseudo-random package bytes (incompressible, like firmware)."""
    return random.Random(seed).randbytes(size)


def provision(
    admin: ManagementClient,
    data: bytes,
    *,
    module_type: Literal["fota", "sota"] = "fota",
    current: str = "1.0.0",
    target: str = "1.0.1",
    file_name: str = "firmware.bin",
    device_name: str = "demo-device",
    task: dict[str, Any] | None = None,
) -> Provisioned:
    """Create a product, a device, the package ``data`` and a task for the device.

    ``task`` adds to the task's creation arguments (``retry``, ``interval``, ``signal``, ...;
    see :meth:`~onenet_ota.management.ManagementClient.create_task`).
    Raises :class:`~onenet_ota.management.ManagementError` when the server refuses a step.
    """
    product = admin.create_product(name="demo")
    if product.access_key is None:  # a created product is always shown with its key
        raise ProtocolError("the server created a product without telling its access key")
    device = admin.create_device(product.pid, device_name)
    package = admin.upload_package(
        data, pid=product.pid, module_type=module_type, target=target, file_name=file_name
    )
    options: dict[str, Any] = {"retry": 3, "interval": 1, **(task or {})}
    created = admin.create_task(package.id, dev_ids=[device.dev_id], **options)
    return Provisioned(
        pid=product.pid,
        access_key=product.access_key,
        dev_id=device.dev_id,
        device_name=device.name,
        package_id=package.id,
        task_id=created.id,
        module_type=module_type,
        current=current,
        target=target,
        size=package.size,
        md5=package.md5,
    )


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m onenet_ota.demo",
        description="One complete OTA upgrade against a throwaway local platform.",
    )
    parser.add_argument(
        "--size", type=int, default=8 * 1024 * 1024, help="package bytes (default 8 MiB)"
    )
    parser.add_argument(
        "--chunk-size", default="16k", help="download chunk, as the CLI takes it (default 16k)"
    )
    parser.add_argument("--type", choices=["fota", "sota"], default="fota")
    parser.add_argument(
        "--dialect",
        choices=["classic", "studio", "fuse"],
        default="classic",
        help="the device API the device speaks (default classic; spec §12, §13)",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.size <= 2**31 - 1:
        parser.error("--size must be from 1 to 2^31-1 bytes")
    return args


def _say(text: str) -> None:
    print(text, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the exit status."""
    args = _parse(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="onenet-ota-demo-") as tmp:
            return _demo(Path(tmp), args)
    except KeyboardInterrupt:
        print("\ninterrupted; the server was stopped and its files removed", file=sys.stderr)
        return 130


def _demo(tmp: Path, args: argparse.Namespace) -> int:
    _say("==> starting the platform (onenet-ota serve, SQLite) in a temporary directory")
    try:
        server = LocalServer(data_dir=tmp / "server").start()
    except LocalServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        _say(f"    listening on {server.url}")
        admin = ManagementClient(server.url, server.admin_token)
        try:
            return _upgrade(tmp, args, server, admin)
        except ManagementError as exc:
            print(f"error: the management API refused a step: {exc}", file=sys.stderr)
            return 1
        finally:
            admin.close()
    finally:
        _say("==> stopping the platform")
        server.stop()


def _upgrade(
    tmp: Path, args: argparse.Namespace, server: LocalServer, admin: ManagementClient
) -> int:
    data = generate_package(args.size)
    _say(
        f"==> management API: product, device, {len(data)}-byte {args.type.upper()} package "
        f"and task (the device speaks the {args.dialect} dialect)"
    )
    world = provision(admin, data, module_type=args.type)
    _say(
        f"    product {world.pid}, device {world.dev_id}, package {world.package_id} "
        f"(md5 {world.md5}), task {world.task_id}: {world.current} -> {world.target}"
    )
    output = tmp / "device" / "firmware.bin"
    output.parent.mkdir()
    command = [
        sys.executable,
        "-m",
        "onenet_ota.cli.main",
        "device",
        "upgrade",
        *world.device_args(server.url, args.dialect),
        "--state-dir",
        str(tmp / "device" / "state"),
        "--output",
        str(output),
        "--chunk-size",
        args.chunk_size,
    ]
    _say("==> onenet-ota device upgrade " + " ".join(command[5:]))
    # The access key travels in the environment, as the CLI recommends, never on a command line.
    env = {**os.environ, "ONENET_OTA_ACCESS_KEY": world.access_key}
    status = subprocess.run(command, env=env, check=False).returncode  # noqa: S603
    _say(f"    exit status {status}")

    _say("==> the server's record of the task")
    task = admin.get_task(world.task_id)
    rows = list(admin.iter_task_devices(world.task_id))
    counts = ", ".join(f"{k}={v}" for k, v in task.counts.model_dump().items() if v)
    _say(f"    task {task.id}: target {task.target}, status {task.status}, {counts}")
    for row in rows:
        _say(
            f"    device {row.dev_id}: state {row.state}, progress {row.progress}, "
            f"result code {row.result_code} {row.status_name or ''}".rstrip()
        )
    device = admin.get_device(world.dev_id)
    version = device.f_version if args.type == "fota" else device.s_version
    _say(f"    device version on the server: {version}")

    installed = output.read_bytes() if output.exists() else b""
    identical = hashlib.md5(installed, usedforsecurity=False).hexdigest() == world.md5
    _say(f"    installed file identical to the package: {'yes' if identical else 'NO'}")
    ok = (
        status == 0
        and identical
        and [row.state for row in rows] == ["succeeded"]
        and version == world.target
    )
    _say("==> demo " + ("succeeded" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
