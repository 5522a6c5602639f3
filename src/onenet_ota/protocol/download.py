"""The one-byte download error reply of E6 (spec §6.6.4, decision D7)."""

from __future__ import annotations

from enum import IntEnum


class DownloadError(IntEnum):
    """The code a download without ``Content-Length`` carries as its single body byte."""

    NOT_FOUND = 1  # the package file is missing
    SIZE_MISMATCH = 2  # the stored size differs from the recorded size
    INVALID_TOKEN = 3  # unknown or expired token, or task not active
    READ_FAILED = 4  # I/O failure reading the file
    BAD_PARAMETER = 5  # malformed s_id
    NB_RESTRICTED = 6  # reserved: NB base-station restriction, never produced (D7)

    @property
    def text(self) -> str:
        """A short description, for messages."""
        return _TEXT[self]


_TEXT = {
    DownloadError.NOT_FOUND: "resource not found",
    DownloadError.SIZE_MISMATCH: "file size inconsistent",
    DownloadError.INVALID_TOKEN: "invalid token",
    DownloadError.READ_FAILED: "failed to get the file",
    DownloadError.BAD_PARAMETER: "request parameter error",
    DownloadError.NB_RESTRICTED: "NB base-station restriction",
}


def decode_error_body(body: bytes) -> DownloadError | None:
    """The error code of a body without Content-Length, or None if it is not one.

    OneNET does not say whether the byte is raw or an ASCII digit, so both are accepted (§10).
    """
    if len(body) != 1:
        return None
    value = body[0]
    if 0x31 <= value <= 0x36:  # ASCII '1'..'6'
        value -= 0x30
    try:
        return DownloadError(value)
    except ValueError:
        return None
