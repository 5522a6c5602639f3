"""DeviceCaches: one device's invalidation, clearing everything, facts racing an invalidation,
and the chunk cache's fast path over a real package file.

Unit tests of the cache object alone; the service's and the device API's use of it (and the
change feed calling it) are tested in test_device_service, test_device_api and test_changes.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from sqlalchemy import create_engine

from onenet_ota.protocol.errno import Errno
from onenet_ota.protocol.states import TaskState
from onenet_ota.protocol.status import TaskType
from onenet_ota.server import wire
from onenet_ota.server.blobs import BlobStore
from onenet_ota.server.device_caches import (
    Answer,
    ChunkKey,
    DeviceCaches,
    check_task_key,
    chunk_key,
)
from onenet_ota.server.device_service import Basis, DeviceRef, DownloadGrant, Principal
from onenet_ota.server.http import Response
from onenet_ota.server.timeline import ServedBytes

NOW = 1_700_000_000.0


def _grant(dev_id: int) -> DownloadGrant:
    return DownloadGrant(
        device_task_id=dev_id,
        dev_id=dev_id,
        state=TaskState.DOWNLOADING,
        token_issued_at=int(NOW),
        current=True,
        deadline=None,
        sha256="ab" * 32,
        size=10,
        file_name="fw.bin",
    )


def _fill(caches: DeviceCaches, dev_id: int) -> Basis:
    """Every fact about ``dev_id``, and a memoised reply and a chunk resting on them."""
    generation = caches.generation
    authorization = f"auth-of-{dev_id}"
    principal = Principal("123", f"dev{dev_id}", int(NOW) + 3600)
    device = DeviceRef(dev_id, "123", f"dev{dev_id}")
    key = check_task_key(TaskType.FOTA, "1.0", None, None)
    answer = Answer(Errno.NO_TASK, None, NOW + 3600)
    caches.keep_principal(generation, authorization, principal, dev_id)
    caches.keep_device(device)
    caches.keep_grant(generation, f"ota_token{dev_id}", _grant(dev_id))
    caches.keep_answer(generation, dev_id, key, answer)
    basis = Basis(authorization, principal, dev_id, device, key, answer)
    caches.replies.put(("/ota", str(dev_id), authorization), (basis, wire.envelope(Errno.NO_TASK)))
    caches.chunks.put(("ab" * 32, 10, "fw.bin", str(dev_id), "classic"), wire.envelope(Errno.SUCC))
    return basis


def _facts(caches: DeviceCaches, dev_id: int) -> list[object]:
    return [
        caches.principal(f"auth-of-{dev_id}"),
        caches.device(dev_id),
        caches.grant(f"ota_token{dev_id}"),
        caches.check_task(dev_id, TaskType.FOTA, "1.0"),
    ]


def test_invalidate_drops_one_devices_facts_and_retires_its_replies() -> None:
    caches = DeviceCaches(ttl=60, clock=lambda: NOW)
    one, two = _fill(caches, 1), _fill(caches, 2)
    assert caches.holds(one)
    assert caches.holds(two)
    caches.invalidate(1)
    assert _facts(caches, 1) == [None] * 4
    assert None not in _facts(caches, 2)
    assert not caches.holds(one)  # the memoised reply no longer rests on cached facts
    assert caches.holds(two)


def test_clear_drops_every_cache_and_a_racing_fact_is_not_kept() -> None:
    caches = DeviceCaches(ttl=60, clock=lambda: NOW)
    _fill(caches, 1)
    before = caches.generation
    caches.clear()
    assert _facts(caches, 1) == [None] * 4
    assert len(caches.replies) == len(caches.chunks) == 0
    # A fact read before the clear (generation ``before``) may be stale: it is not kept.
    caches.keep_grant(before, "ota_late", _grant(1))
    caches.keep_answer(before, 1, ("E5", "ota_late"), Answer(Errno.SUCC, None, NOW + 60))
    assert caches.grant("ota_late") is None
    assert caches.check_token(1, "ota_late") is None


def test_serve_chunk_serves_while_the_open_file_keeps_the_grants_size(tmp_path: Path) -> None:
    """The cached-download fast paths' shared half: a reply built once from the open file and
    served again, its bytes counted each time; a chunk nobody built, or a file whose size is
    no longer the grant's, goes the full way and counts nothing."""
    blobs = BlobStore(tmp_path / "blobs")
    stored = blobs.put_bytes(b"0123456789")
    caches = DeviceCaches(ttl=60, clock=lambda: NOW, blobs=blobs)
    served = ServedBytes(create_engine("sqlite://"), lambda: NOW)
    grant = dataclasses.replace(_grant(7), sha256=stored.sha256)
    built: list[ChunkKey] = []

    def build(fd: int, key: ChunkKey) -> Response:
        built.append(key)
        reply = Response(206, [("Content-Length", "4")], os.pread(fd, 4, 2))
        caches.chunks.put(key, reply, 100)
        return reply

    key = chunk_key(grant, "2-5", "classic")
    assert key == (stored.sha256, 10, "fw.bin", "2-5", "classic")
    assert caches.serve_chunk(key, served, 7, build) is None  # the file is not open yet
    assert caches.files is not None
    caches.files.get(stored.sha256)  # opened by a request that went the full way
    first = caches.serve_chunk(key, served, 7, build)
    assert first is not None
    assert first.body == b"2345"
    assert caches.serve_chunk(key, served, 7) is first  # cached: not built again
    assert built == [key]
    assert served.take(7) == 8
    # Another dialect frames the same bytes its own way: not cached, nothing to build it.
    assert caches.serve_chunk(chunk_key(grant, "2-5", "fuse"), served, 7) is None
    os.truncate(blobs.path(stored.sha256), 5)  # the file no longer has the grant's size
    assert caches.serve_chunk(key, served, 7) is None
    assert caches.serve_chunk(chunk_key(grant, "0-1", "classic"), served, 7, build) is None
    assert served.take(7) == 0
    assert built == [key]
    caches.close()


def test_keep_chunk_keeps_a_reply_from_its_second_read_and_remembers_boundedly() -> None:
    """A chunk's first read leaves only its key's hash; the second keeps the reply. The hashes
    of chunks read once are bounded, whatever keys clients make (a Range value is theirs)."""
    caches = DeviceCaches(ttl=60, clock=lambda: NOW)
    grant = _grant(7)
    reply = Response(206, [("Content-Length", "4")], b"2345")
    key = chunk_key(grant, "2-5", "classic")
    caches.keep_chunk(key, reply)
    assert key not in caches.chunks
    caches.keep_chunk(key, reply)
    assert caches.chunks.get(key) is reply
    caches.forget_chunks()
    caches.keep_chunk(key, reply)
    assert key not in caches.chunks  # a first read again
    for n in range(40_000):
        caches.keep_chunk(chunk_key(grant, f"{n}-{n + 3}", "fuse"), reply)
    assert len(caches._seen_chunks) <= 16384
    assert len(caches.chunks) == 0
