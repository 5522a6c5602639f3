"""TLS for the listener: the C-SDK-compatible server context (spec §2.2, D25)."""

from __future__ import annotations

import os
import ssl
from typing import Final

__all__ = ["C_SDK_CIPHERS", "make_server_ssl_context"]


# §2.2/D25: the C SDK offers only these four static-RSA AES-CBC suites, over TLS 1.2 only.
C_SDK_CIPHERS: Final = "AES256-SHA256:AES128-SHA256:AES256-SHA:AES128-SHA"
_MODERN_CIPHERS: Final = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:ECDHE+AES"


def make_server_ssl_context(
    certfile: str | os.PathLike[str],
    keyfile: str | os.PathLike[str] | None = None,
    *,
    c_sdk_compatible: bool,
) -> ssl.SSLContext:
    """A server TLS context for ``certfile``/``keyfile`` (PEM).

    With ``c_sdk_compatible`` it also accepts the official C SDK's handshake (§2.2, D25): TLS 1.2
    with the four RSA AES-CBC suites, which need an RSA certificate. Modern suites stay
    preferred, so other clients still get forward secrecy. Without it: TLS 1.2+ with Python's
    default suites, which the C SDK cannot negotiate.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile, keyfile)
    if c_sdk_compatible:
        context.set_ciphers(f"{_MODERN_CIPHERS}:{C_SDK_CIPHERS}")
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    return context
