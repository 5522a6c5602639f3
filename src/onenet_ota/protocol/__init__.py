"""The OneNET classic OTA protocol, once, for client and server (spec: docs/protocol.md).

No I/O lives here: paths, errno, status codes, value formats, the Range grammar, the task state
machine and the wire codecs. Every quirk carries the spec section that demands it.
"""
