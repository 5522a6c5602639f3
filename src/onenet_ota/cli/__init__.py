"""The ``onenet-ota`` command."""
