"""The README is complete in itself: every module in its layout, no pointer outside
the repository, install lines that install this package."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _layout() -> str:
    return README.split("## Layout\n", 1)[1].split("\n## ", 1)[0]


def test_the_layout_names_every_module() -> None:
    """Each Python module of the package is named in the README's layout."""
    modules = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "taskpool").rglob("*.py"))
    missing = [m for m in modules if m not in _layout()]
    assert not missing, f"not in the README's layout: {missing}"


def test_the_readme_points_nowhere_outside_the_repository() -> None:
    """No web address and no Markdown link: the README is also the package's long
    description, read where relative links into tests/ do not resolve."""
    assert not re.findall(r"https?://", README)
    assert not re.findall(r"\]\([^)]*\)", README)


def test_no_install_line_fetches_the_unrelated_package() -> None:
    """`pip install taskpool` (any extras) names another project on the package index;
    every install line installs from the repository instead."""
    for line in README.splitlines():
        if "pip install" in line and "never run it" not in line:
            assert not re.search(r"pip install '?taskpool(\[|\s|$|')", line), line
