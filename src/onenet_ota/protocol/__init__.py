"""The OneNET OTA device protocol, once, for client and server (spec: docs/protocol.md).

No I/O lives here: paths, errno and codes, status codes, value formats, the Range grammar, the
task state machine and the wire codecs. The classic API (§4-§6) came first (``endpoints``,
``errno``, ``messages``, ``download``); ``dialects`` adds the Studio (§12) and fuse (§13) dialects
as data beside it, with ``codes``, ``envelopes`` and ``framing``. Every quirk carries the spec
section that demands it; docs/dialects.md records where the spec left a choice.
"""
