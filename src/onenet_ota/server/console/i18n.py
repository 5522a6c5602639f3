"""The console's languages: Simplified Chinese and English, from gettext catalogues.

The message catalogues are Babel's standard files: ``locale/messages.pot`` is extracted from the
templates and the console's Python code (``pybabel extract -F babel.cfg``), and
``locale/zh_Hans/LC_MESSAGES/messages.po`` translates it. English is the source language, so it
needs no catalogue. The ``.po`` file is compiled in memory when the console starts, so the
package ships no generated ``.mo`` file and there is no build step.

The language is the ``lang`` cookie when the operator chose one, else the best match of the
browser's ``Accept-Language``, else English.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from babel import Locale, UnknownLocaleError
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po
from babel.support import NullTranslations, Translations

__all__ = ["DEFAULT", "LANGUAGES", "LOCALE_DIR", "load_translations", "negotiate"]

LOCALE_DIR: Final = Path(__file__).parent / "locale"

LANGUAGES: Final[Mapping[str, str]] = {"en": "English", "zh_Hans": "简体中文"}
"""The console's languages by code, each named in itself (for the language switch)."""

DEFAULT: Final = "en"

_MAX_ACCEPT = 512  # an Accept-Language past this is ignored rather than parsed
_MAX_RANGES = 16


def load_translations() -> dict[str, NullTranslations]:
    """Every language's translations, compiled from the ``.po`` catalogues."""
    result: dict[str, NullTranslations] = {DEFAULT: NullTranslations()}
    for code in LANGUAGES:
        if code == DEFAULT:
            continue
        po = LOCALE_DIR / code / "LC_MESSAGES" / "messages.po"
        with po.open("rb") as file:
            catalog = read_po(file, locale=code)
        buffer = io.BytesIO()
        write_mo(buffer, catalog)
        buffer.seek(0)
        result[code] = Translations(buffer, domain="messages")
    return result


def _accepted(header: str) -> list[str]:
    """The language ranges of an ``Accept-Language`` value, best first (RFC 9110 §12.5.4)."""
    ranked: list[tuple[float, int, str]] = []
    for index, part in enumerate(header.split(",")[:_MAX_RANGES]):
        tag, _, params = part.strip().partition(";")
        tag = tag.strip()
        if not tag or tag == "*":
            continue
        quality = 1.0
        params = params.strip()
        if params.startswith("q="):
            try:
                quality = float(params[2:])
            except ValueError:
                continue
        if quality > 0:
            ranked.append((-quality, index, tag))
    return [tag for _, _, tag in sorted(ranked)]


def negotiate(cookie: str | None, accept_language: str | None) -> str:
    """The language to answer in: the operator's choice, else the browser's, else English."""
    if cookie is not None and cookie in LANGUAGES:
        return cookie
    if accept_language and len(accept_language) <= _MAX_ACCEPT:
        for tag in _accepted(accept_language):
            try:
                locale = Locale.parse(tag, sep="-")
            except (ValueError, TypeError, UnknownLocaleError):
                continue
            if locale.language == "zh":
                # Traditional-script and Taiwan/Hong Kong readers get English rather than a
                # script they did not ask for; every other zh is Simplified.
                if locale.script == "Hant" or locale.territory in {"TW", "HK", "MO"}:
                    continue
                return "zh_Hans"
            if locale.language == "en":
                return "en"
    return DEFAULT
