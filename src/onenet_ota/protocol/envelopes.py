"""The JSON reply envelopes of the three dialects (spec §4.3, §12.1, §13.2).

Rules:

1. Classic and Studio: ``{"errno":N,"error":"text"[,"data":{...}]}`` (§4.3; Studio keeps it,
   §12.1). ``errno`` is always present and a JSON number (§8.2 item 8: a ``code``/``msg``
   envelope breaks the C SDK).
2. Fuse: ``{"code":N,"msg":"text","request_id":"<32 lower-case hex>"[,"data":{...}]}`` (§13.2),
   ``request_id`` random per response.
3. Every business answer is HTTP 200, errors included (D1, §13.2). JSON replies carry
   ``Content-Type: application/json`` (classic, Studio: S12) or
   ``application/json;charset=UTF-8`` (fuse: §13.2, F11).
4. Encoding is canonical: compact, keys in the order above (D26). Decoding is strict about JSON
   types (``bool`` is not an int, §2.4) and tolerant of what it need not judge: unknown keys are
   ignored, and a fuse ``request_id`` is read as any string, since only the server promises its
   form.

Theory of operation. An :class:`EnvelopeCodec` is a value: the server encodes the code and text
that :mod:`onenet_ota.protocol.codes` chose, a client decodes a body into a :class:`Reply` and
looks at ``code`` alone (never the text, D2). ``CLASSIC_ENVELOPE`` serves classic and Studio,
``FUSE_ENVELOPE`` fuse; :mod:`onenet_ota.protocol.dialects` says which dialect uses which.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any, Final

from onenet_ota.protocol.messages import WireFormatError, dumps

JSON_CONTENT_TYPE: Final = "application/json"
FUSE_JSON_CONTENT_TYPE: Final = "application/json;charset=UTF-8"  # §13.2, F11
REQUEST_ID_RE: Final = re.compile(r"[0-9a-f]{32}")


def new_request_id() -> str:
    """A fresh fuse ``request_id``: 32 random lower-case hex digits (§13.2)."""
    return secrets.token_hex(16)


@dataclass(frozen=True, slots=True)
class Reply:
    """A decoded envelope. ``code`` is an int (unknown values are possible); ``request_id`` is
    None for the errno envelope."""

    code: int
    text: str
    data: dict[str, Any] | None
    request_id: str | None = None


@dataclass(frozen=True, slots=True)
class EnvelopeCodec:
    """One envelope form: the names of its code and text keys, and whether it has a request id."""

    code_key: str
    text_key: str
    has_request_id: bool
    content_type: str

    def encode(
        self,
        code: int,
        text: str,
        data: dict[str, Any] | None = None,
        *,
        request_id: str | None = None,
    ) -> bytes:
        """The compact body (§2.5). Fuse needs ``request_id`` (see :func:`new_request_id`);
        the errno envelope refuses one."""
        if type(code) is not int:
            raise TypeError("an envelope code is an int")
        body: dict[str, Any] = {self.code_key: code, self.text_key: text}
        if self.has_request_id:
            if request_id is None or REQUEST_ID_RE.fullmatch(request_id) is None:
                raise ValueError("the fuse envelope needs a request_id of 32 lower-case hex digits")
            body["request_id"] = request_id
        elif request_id is not None:
            raise ValueError("the errno envelope has no request_id")
        if data is not None:
            body["data"] = data
        return dumps(body)

    def decode(self, body: bytes) -> Reply:
        """Decode a reply body; raises :class:`WireFormatError` when it is not this envelope."""
        try:
            obj = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise WireFormatError(f"reply is not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise WireFormatError("reply is not a JSON object")
        code = obj.get(self.code_key)
        if type(code) is not int:
            raise WireFormatError(f"reply has no integer {self.code_key!r}")
        text = obj.get(self.text_key, "")
        if not isinstance(text, str):
            raise WireFormatError(f"reply's {self.text_key!r} is not a string")
        data = obj.get("data")
        if data is not None and not isinstance(data, dict):
            raise WireFormatError("reply's 'data' is not an object")
        request_id = None
        if self.has_request_id:
            request_id = obj.get("request_id")
            if request_id is not None and not isinstance(request_id, str):
                raise WireFormatError("reply's 'request_id' is not a string")
        return Reply(code=code, text=text, data=data, request_id=request_id)


CLASSIC_ENVELOPE: Final = EnvelopeCodec("errno", "error", False, JSON_CONTENT_TYPE)
"""§4.3; Studio too (§12.1, S12)."""
FUSE_ENVELOPE: Final = EnvelopeCodec("code", "msg", True, FUSE_JSON_CONTENT_TYPE)
"""§13.2."""
