"""Event types: the C SDK's ``ota_state_t`` values, and payloads that keep package bytes short."""

from __future__ import annotations

from onenet_ota.device import (
    DownloadedChunk,
    EventKind,
    PackageDownloaded,
    StatusReported,
    TaskChecked,
    TokenChecked,
    VersionPosted,
)


def test_kinds_are_the_seeds_enum() -> None:
    assert [(k.name, k.value) for k in EventKind] == [
        ("POST_VERSION", 0),
        ("CHECK_TASK", 1),
        ("CHECK_TOKEN", 2),
        ("DOWNLOAD_PACKAGE", 3),
        ("REPORT_STATUS", 4),
    ]
    kinds = [
        cls.kind
        for cls in (VersionPosted, TaskChecked, TokenChecked, PackageDownloaded, StatusReported)
    ]
    assert kinds == list(EventKind)


def test_chunk_repr_hides_the_bytes() -> None:
    chunk = DownloadedChunk(b"\x00" * 4096, 0, 4095, 10000)
    assert repr(chunk) == (
        "DownloadedChunk(<4096 bytes>, start=0, end=4095, total=10000, partial=True)"
    )
