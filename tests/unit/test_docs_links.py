"""The README and docs/ link to files that exist, and the README reaches every page."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def local_links(page: Path) -> list[str]:
    return [
        target
        for target in LINK.findall(page.read_text())
        if not target.startswith(("http://", "https://", "mailto:", "#"))
    ]


def test_every_local_link_points_to_a_file():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = [
        f"{page.relative_to(ROOT)}: {target}"
        for page in pages
        for target in local_links(page)
        if not (page.parent / target.split("#")[0]).exists()
    ]
    assert broken == []


def test_the_readme_links_every_page_of_docs():
    linked = {(ROOT / target.split("#")[0]).resolve() for target in local_links(ROOT / "README.md")}
    pages = {page.resolve() for page in (ROOT / "docs").glob("*.md")}
    assert sorted(str(p.relative_to(ROOT)) for p in pages - linked) == []
