"""The web console for operators at ``/console``: :class:`.app.Console`.

This module stays light (no Jinja2 or Babel import), so the server can route to the console
without loading it when the console is turned off.
"""

from typing import Final

__all__ = ["PREFIX"]

PREFIX: Final = "/console"
"""Where the console is served, on the management API's listener."""
