"""The repository's documents stay true: the spec copy, the spec labels the code cites, and the
words a reader of this repository alone can follow.

- ``docs/protocol.md`` is the project's copy of the wire specification; beside a checkout of the
  shared material (``../shared/spec/protocol.md``) the two must be byte-identical.
- Every spec label cited in ``src/``, ``tests/``, ``bench/``, ``docs/`` and the top-level documents
  (``§6.6.3``, ``D8``, ``T5``, ``S7``, ``F10``, ``P3``, ``E6``, ``S-C``, ``Appendix B.1``) must
  name a section heading or a table row that defines it in ``docs/protocol.md``. A citation that
  resolves nowhere sends the reader to the wrong rule.
- Words that mean nothing inside this repository (another tracker's issue numbers, a document
  that is not here) stay out of the code and documents.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "docs" / "protocol.md"
SHARED_SPEC = ROOT.parent / "shared" / "spec" / "protocol.md"

SCANNED_DIRS = ("src", "tests", "bench", "docs", "deploy")
SCANNED_FILES = ("README.md", "CHANGELOG.md", "pyproject.toml")
TEXT_SUFFIXES = frozenset({".py", ".md", ".ini", ".toml", ".mako", ".service", ".conf"})

# A section citation: "§6.6.3", "spec §2.5", "(§6.6.3/D8)". A "§" right after an RFC number
# cites that RFC ("RFC 9112 §9.3"), not the spec, and is skipped.
_SECTION = re.compile(r"(?P<rfc>RFC\s*\d+\s*)?§\s?(?P<number>\d+(?:\.\d+)*)")
# Decisions and table rows: D (§9), T (§5.3), S (§12.4), F (§13.6), P (§4.2), E (§4.1), each
# with a number from 1 and at most two digits. Not inside a longer word or number (hex, base64,
# ruff codes such as S104, variables such as T0), and not inside quotes (test data such as "F9").
_LABEL = re.compile(r"(?<![\w%\\'\"$@-])(?P<label>[DTSFPE][1-9][0-9]?)(?![\w'\"-])")
# The Studio and fuse endpoints: S-V, S-Q, S-C, S-T, S-D, S-R and the same with F.
_DIALECT_ENDPOINT = re.compile(r"(?<![\w-])(?P<label>[SF]-[A-Z])(?![\w-])")
_APPENDIX = re.compile(r"\bAppendix (?P<label>[A-Z](?:\.\d+)?)\b")

_HEADING = re.compile(
    r"^#{2,4} (?:(?P<number>\d+(?:\.\d+)*)\.?|Appendix (?P<appendix>[A-Z])|(?P<sub>[A-Z]\.\d+)) "
)
_TABLE_ROW = re.compile(r"^\| (?P<label>[A-Z](?:-[A-Z]|\d+)) \|")


def spec_sections(spec: str) -> set[str]:
    """Numbers of the spec's section headings ("2", "6.6.1") and its appendices ("B", "B.1")."""
    found = set()
    for line in spec.splitlines():
        if match := _HEADING.match(line):
            found.add(match["number"] or match["appendix"] or match["sub"])
    return found


def spec_labels(spec: str) -> set[str]:
    """Labels a table row of the spec defines: decisions, transitions, endpoints, pre-checks."""
    return {m["label"] for line in spec.splitlines() if (m := _TABLE_ROW.match(line))}


def citations(text: str) -> Iterator[tuple[int, str]]:
    """``(line number, label)`` for every spec label cited in ``text``; sections as "§n.n",
    appendices as "Appendix X"."""
    for number, line in enumerate(text.splitlines(), 1):
        if "noqa" in line:
            line = line.split("noqa", 1)[0]  # ruff codes (S603, B018) are not spec labels
        for match in _SECTION.finditer(line):
            if match["rfc"] is None:
                yield number, "§" + match["number"]
        for pattern in (_LABEL, _DIALECT_ENDPOINT):
            for match in pattern.finditer(line):
                yield number, match["label"]
        for match in _APPENDIX.finditer(line):
            yield number, "Appendix " + match["label"]


def scanned_files() -> Iterator[Path]:
    """The repository's own text files, except the spec copy (it is checked against the law)."""
    for name in SCANNED_DIRS:
        for path in sorted((ROOT / name).rglob("*")):
            if path.suffix in TEXT_SUFFIXES and path.is_file() and path != SPEC:
                yield path
    for name in SCANNED_FILES:
        if (ROOT / name).is_file():
            yield ROOT / name


def resolves(label: str, sections: set[str], labels: set[str]) -> bool:
    """Whether the spec defines ``label`` (as produced by :func:`citations`)."""
    if label.startswith("§"):
        return label[1:] in sections
    if label.startswith("Appendix "):
        return label.removeprefix("Appendix ") in sections
    return label in labels


# --------------------------------------------------------------------------------------------
# The spec copy


def test_spec_copy_is_the_shared_spec() -> None:
    if not SHARED_SPEC.is_file():
        pytest.skip(f"no shared spec at {SHARED_SPEC}: nothing to compare docs/protocol.md with")
    assert SPEC.read_bytes() == SHARED_SPEC.read_bytes(), (
        "docs/protocol.md differs from ../shared/spec/protocol.md: copy the spec over it; "
        "project notes belong in separate files (docs/glossary.md)"
    )


# --------------------------------------------------------------------------------------------
# Citations


def test_the_citation_finder_reads_the_forms_the_code_uses() -> None:
    text = (
        "(§6.6.3/D8) spec §2.5 (§3.4. D13 T5, S7 F10 P3 E6 S-C F-D §6.6.1-§6.6.3 Appendix B.1\n"
        'RFC 9112 §9.3  # noqa: S104\nT0 = 1.0; x = "F9"; "%E4%B8%AD"; 0xD8; K1D8; S104; D-8\n'
    )
    assert list(citations(text)) == [
        (1, "§6.6.3"), (1, "§2.5"), (1, "§3.4"), (1, "§6.6.1"), (1, "§6.6.3"),
        (1, "D8"), (1, "D13"), (1, "T5"), (1, "S7"), (1, "F10"), (1, "P3"), (1, "E6"),
        (1, "S-C"), (1, "F-D"), (1, "Appendix B.1"),
    ]  # fmt: skip


def test_the_spec_defines_what_the_resolver_looks_for() -> None:
    spec = SPEC.read_text(encoding="utf-8")
    sections, labels = spec_sections(spec), spec_labels(spec)
    assert {"1", "2.5", "6.6.4", "13.7", "A", "B", "B.3", "C"} <= sections
    assert {f"D{n}" for n in range(1, 27)} <= labels
    assert {f"T{n}" for n in range(1, 17)} <= labels
    assert {f"S{n}" for n in range(1, 13)} | {f"F{n}" for n in range(1, 15)} <= labels
    assert {f"E{n}" for n in range(1, 10)} | {"P1", "P2", "P3", "S-C", "F-R"} <= labels
    assert not resolves("§6.6.5", sections, labels)
    assert not resolves("D27", sections, labels)
    assert not resolves("Appendix D", sections, labels)


def test_every_cited_spec_label_resolves() -> None:
    spec = SPEC.read_text(encoding="utf-8")
    sections, labels = spec_sections(spec), spec_labels(spec)
    cited = 0
    unresolved = []
    for path in scanned_files():
        if path == Path(__file__).resolve():
            continue  # the finder's own examples include labels that must not resolve
        for line, label in citations(path.read_text(encoding="utf-8")):
            cited += 1
            if not resolves(label, sections, labels):
                unresolved.append(f"{path.relative_to(ROOT)}:{line}: {label}")
    assert cited > 500  # the scan reaches the code: hundreds of citations live there
    assert unresolved == [], "cited but not defined in docs/protocol.md:\n" + "\n".join(unresolved)


# --------------------------------------------------------------------------------------------
# Words


# Another tracker's numbers and documents that are not in this repository.
_FOREIGN = re.compile(r"\bissues? #?\d+|\bthe seed\b|\bseed's\b|\bseed-compatible\b|style\.md")


def test_no_words_that_point_outside_the_repository() -> None:
    found = []
    for path in scanned_files():
        if path == Path(__file__).resolve():
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if match := _FOREIGN.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {match[0]!r}")
    assert found == [], "\n".join(found)


# --------------------------------------------------------------------------------------------
# Links between documents

_LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to
    hyphens (each space, so "a — b" becomes "a--b")."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(markdown: Path) -> set[str]:
    """The anchors of ``markdown``'s headings."""
    found = set()
    for line in markdown.read_text(encoding="utf-8").splitlines():
        if match := re.match(r"#{1,6} (.+)", line):
            found.add(github_anchor(match[1]))
    return found


def test_github_anchor() -> None:
    assert github_anchor("6.6.4 Error reply: one byte, no Content-Length") == (
        "664-error-reply-one-byte-no-content-length"
    )
    assert github_anchor("Appendix B — test vectors") == "appendix-b--test-vectors"
    assert github_anchor("6.1 E1 — report version: `POST /ota/device/version`") == (
        "61-e1--report-version-post-otadeviceversion"
    )


def test_links_between_documents_resolve() -> None:
    broken = []
    for path in scanned_files():
        if path.suffix != ".md":
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for match in _LINK.finditer(line):
                target = match["target"]
                if target.startswith(("http://", "https://", "mailto:")):
                    continue
                file_part, _, anchor = target.partition("#")
                linked = (path.parent / file_part).resolve() if file_part else path
                where = f"{path.relative_to(ROOT)}:{number}: {target}"
                if not linked.exists():
                    broken.append(f"{where} (no such file)")
                elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                    broken.append(f"{where} (no such heading)")
    assert broken == [], "\n".join(broken)


# --------------------------------------------------------------------------------------------
# Package metadata


def _project() -> dict[str, Any]:
    project: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project


def test_package_metadata_links_name_files_of_the_repository() -> None:
    project = _project()
    assert project["license"] == "MIT"
    assert (ROOT / "LICENSE").read_text(encoding="utf-8").startswith("MIT License\n")
    assert project["license-files"] == ["LICENSE"]
    in_repository = 0
    for label, url in project["urls"].items():
        _, found, path = url.partition("/blob/main/")
        if found:
            in_repository += 1
            assert (ROOT / path).is_file(), f"{label}: {url} names no file of the repository"
    assert in_repository >= 2


def test_changelog_has_an_entry_for_the_packaged_version() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    version = re.escape(_project()["version"])
    assert "\n## [Unreleased]\n" in changelog
    assert re.search(rf"^## \[{version}\] - \d{{4}}-\d{{2}}-\d{{2}}$", changelog, re.MULTILINE)
    assert re.search(rf"^\[{version}\]: ", changelog, re.MULTILINE)  # the heading's link
