"""onenet-ota: OTA upgrades for OneNET devices.

Subpackages, with one-way dependencies:

- :mod:`onenet_ota.protocol` and :mod:`onenet_ota.auth`: the OneNET OTA protocol,
  shared by both sides (no I/O).
- :mod:`onenet_ota.device`: the device SDK (client and upgrader). Never imports the server.
- :mod:`onenet_ota.server`: the self-hostable platform.
- :mod:`onenet_ota.cli`: the ``onenet-ota`` command.
"""

__version__ = "0.1.0"
