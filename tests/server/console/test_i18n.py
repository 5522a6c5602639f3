"""Languages: negotiation, and catalogues that are complete and match the sources."""

from __future__ import annotations

from pathlib import Path

import pytest
from babel.messages.frontend import CommandLineInterface
from babel.messages.pofile import read_po

from onenet_ota.server.console import i18n

CONSOLE = Path(i18n.__file__).parent


@pytest.mark.parametrize(
    ("cookie", "accept", "expected"),
    [
        (None, None, "en"),
        (None, "zh-CN,zh;q=0.9,en;q=0.8", "zh_Hans"),
        (None, "zh", "zh_Hans"),
        (None, "zh-Hans-CN", "zh_Hans"),
        (None, "en-US,en;q=0.9,zh-CN;q=0.8", "en"),
        (None, "en;q=0.5,zh-CN;q=0.9", "zh_Hans"),
        (None, "zh-TW", "en"),
        (None, "zh-Hant", "en"),
        (None, "fr-FR,de;q=0.5", "en"),
        (None, "zh;q=0", "en"),
        (None, "garbage;;;q=x,,", "en"),
        (None, "x" * 10_000, "en"),
        ("en", "zh-CN", "en"),
        ("zh_Hans", "en-US", "zh_Hans"),
        ("klingon", "zh-CN", "zh_Hans"),
    ],
)
def test_the_language_is_the_choice_then_the_browser_then_english(
    cookie: str | None, accept: str | None, expected: str
) -> None:
    assert i18n.negotiate(cookie, accept) == expected


def test_every_message_is_translated_into_chinese() -> None:
    with (i18n.LOCALE_DIR / "messages.pot").open("rb") as file:
        template = read_po(file)
    with (i18n.LOCALE_DIR / "zh_Hans" / "LC_MESSAGES" / "messages.po").open("rb") as file:
        catalog = read_po(file, locale="zh_Hans")
    wanted = {m.id for m in template if m.id}
    translated = {m.id for m in catalog if m.id and m.string and not m.fuzzy}
    assert wanted, "the template holds no message"
    assert wanted - translated == set()
    assert translated - wanted == set(), "translations of messages the sources no longer have"


def test_the_template_catalogue_matches_the_sources(tmp_path: Path) -> None:
    # The command is the one babel.cfg documents; a message added to a template or to the
    # console's code without re-extracting fails here.
    out = tmp_path / "messages.pot"
    command = (CONSOLE / "babel.cfg").read_text().splitlines()[0].removeprefix("# ").split()
    assert command[:2] == ["pybabel", "extract"]
    args = [a if not a.startswith("src/") else str(CONSOLE.parents[3] / a) for a in command[2:]]
    args[args.index("-o") + 1] = str(out)
    CommandLineInterface().run(["pybabel", "-q", "extract", *args])  # type: ignore[no-untyped-call]
    with out.open("rb") as file:
        fresh = {m.id for m in read_po(file) if m.id}
    with (i18n.LOCALE_DIR / "messages.pot").open("rb") as file:
        shipped = {m.id for m in read_po(file) if m.id}
    assert fresh == shipped


def test_translations_load_and_translate() -> None:
    translations = i18n.load_translations()
    assert set(translations) == set(i18n.LANGUAGES)
    assert translations["zh_Hans"].gettext("Sign in") == "登录"
    assert translations["en"].gettext("Sign in") == "Sign in"


def test_the_consoles_code_texts_are_the_protocols() -> None:
    # The console marks each status code's meaning for the catalogue; they must stay the
    # protocol table's texts, or a code would show untranslated.
    from onenet_ota.protocol.code_texts import CODE_TEXTS
    from onenet_ota.server.console.app import CODE_MESSAGES

    assert sorted(CODE_MESSAGES) == sorted(entry.text for entry in CODE_TEXTS.values())
    zh = i18n.load_translations()["zh_Hans"]
    for text in CODE_MESSAGES:
        assert zh.gettext(text) != text
