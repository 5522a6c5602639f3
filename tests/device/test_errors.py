"""The exception tree: the C SDK's integer codes, the errno table, messages."""

from __future__ import annotations

import pytest

from onenet_ota.device import errors
from onenet_ota.device.errors import (
    ERRNO_EXCEPTIONS,
    ClientClosedError,
    DownloadError,
    HTTPStatusError,
    InvalidArgumentError,
    LocalError,
    OtaError,
    PlatformError,
    ProtocolError,
    RequestTimeout,
    TransportError,
    platform_error,
)
from onenet_ota.protocol.download import DownloadError as DownloadErrorCode
from onenet_ota.protocol.endpoints import Endpoint
from onenet_ota.protocol.errno import Errno


def test_every_errno_has_an_exception() -> None:
    assert set(ERRNO_EXCEPTIONS) == set(Errno) - {Errno.SUCC}
    for errno, cls in ERRNO_EXCEPTIONS.items():
        assert issubclass(cls, PlatformError)
        # A named class says which errno it stands for; the generic one serves the rest.
        assert cls.errno_value in (errno, None)
        assert (cls is PlatformError) == (cls.errno_value is None)


def test_named_classes_are_distinct() -> None:
    named = [cls for cls in ERRNO_EXCEPTIONS.values() if cls is not PlatformError]
    assert len(named) == len(set(named))


@pytest.mark.parametrize("errno", [e for e in Errno if e is not Errno.SUCC])
def test_platform_error_factory(errno: Errno) -> None:
    error = platform_error(int(errno), "", endpoint=Endpoint.CHECK_TOKEN, data={"k": 1})
    assert type(error) is ERRNO_EXCEPTIONS[errno]
    assert (error.code, error.errno, error.text, error.data) == (errno, errno, errno.text, {"k": 1})
    assert str(error) == f"E5 check token: errno {int(errno)}: {errno.text}"


def test_unknown_errno_keeps_the_platform_text() -> None:
    error = platform_error(77, "", endpoint=None)
    assert type(error) is PlatformError
    assert str(error) == "errno 77: "
    assert platform_error(77, "odd").text == "odd"


def test_codes_follow_the_seed() -> None:
    # 0 success, < 0 local error, < 100 platform errno, >= 100 HTTP status.
    locals_ = [
        InvalidArgumentError("x"),
        ProtocolError("x"),
        ClientClosedError(),
        TransportError("x"),
        RequestTimeout("x"),
    ]
    assert [e.code for e in locals_] == [-2, -3, -5, -11, -13]
    assert all(isinstance(e, LocalError) and e.code < 0 for e in locals_)
    assert HTTPStatusError(404).code == 404
    assert DownloadError(DownloadErrorCode.INVALID_TOKEN).code == 3
    assert platform_error(12, "token expired").code == 12


def test_tree_shape() -> None:
    for cls in (LocalError, PlatformError, DownloadError, HTTPStatusError):
        assert cls.__bases__ == (OtaError,)
    assert issubclass(InvalidArgumentError, ValueError)
    assert issubclass(RequestTimeout, TransportError)
    exported = {name for name in dir(errors) if isinstance(getattr(errors, name), type)}
    documented = errors.__doc__ or ""
    for name in exported:
        cls = getattr(errors, name)
        if issubclass(cls, OtaError):
            assert name in documented, f"{name} missing from the tree in the module docstring"


def test_messages_name_the_endpoint() -> None:
    error = DownloadError(DownloadErrorCode.NOT_FOUND, endpoint=Endpoint.DOWNLOAD)
    assert str(error) == "E6 download package: download error 1: resource not found"
    assert repr(error) == (
        "DownloadError('E6 download package: download error 1: resource not found', code=1)"
    )
    assert str(HTTPStatusError(502, endpoint=Endpoint.TASKING)) == "E4 tasking: HTTP status 502"
    assert str(ProtocolError("bad")) == "bad"
