"""Session cookies and CSRF tokens: signed, expiring, bound to one session."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from onenet_ota.server.console.sessions import KEY_FILE_NAME, SessionCodec, load_or_create_key

KEY = bytes(range(32))


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def test_a_session_survives_its_cookie_round_trip() -> None:
    codec = SessionCodec(KEY)
    session = codec.new("7", "ops <team>", "operator")
    assert codec.decode(codec.encode(session)) == session


def test_a_session_expires() -> None:
    clock = Clock()
    codec = SessionCodec(KEY, lifetime=60, clock=clock)
    cookie = codec.encode(codec.new("7", "ops", "operator"))
    clock.now += 59
    assert codec.decode(cookie) is not None
    clock.now += 2
    assert codec.decode(cookie) is None


def test_a_changed_payload_or_another_key_is_refused() -> None:
    codec = SessionCodec(KEY)
    cookie = codec.encode(codec.new("7", "ops", "viewer"))
    body, mac = cookie.split(".")
    forged = codec.encode(codec.new("7", "ops", "admin")).split(".")[0]
    assert codec.decode(f"{forged}.{mac}") is None
    assert SessionCodec(bytes(32)).decode(cookie) is None
    assert codec.decode(f"{body}.{mac[:-2]}") is None


@given(st.text(max_size=300))
def test_junk_cookies_decode_to_no_session(value: str) -> None:
    assert SessionCodec(KEY).decode(value) is None


def test_csrf_tokens_belong_to_one_session() -> None:
    codec = SessionCodec(KEY)
    one, two = codec.new("1", "a", "admin"), codec.new("1", "a", "admin")
    assert codec.check_csrf(one, codec.csrf_token(one))
    assert not codec.check_csrf(two, codec.csrf_token(one))
    assert not codec.check_csrf(one, None)
    assert not codec.check_csrf(one, "")


def test_the_key_is_made_once_private_and_shared(tmp_path: Path) -> None:
    keys: list[bytes] = []

    def load() -> None:
        keys.append(load_or_create_key(tmp_path))

    threads = [threading.Thread(target=load) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(keys)) == 1
    assert len(keys[0]) == 32
    assert (tmp_path / KEY_FILE_NAME).stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == [KEY_FILE_NAME]  # no temp file left
    assert load_or_create_key(tmp_path) == keys[0]


def test_a_damaged_key_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / KEY_FILE_NAME).write_bytes(b"short")
    with pytest.raises(ValueError, match="remove it"):
        load_or_create_key(tmp_path)
    os.unlink(tmp_path / KEY_FILE_NAME)
