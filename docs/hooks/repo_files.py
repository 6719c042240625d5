"""MkDocs hook: serve files that live outside docs/ without copying them into it.

The pages link to the benchmark figures as ``../benchmarks/results/NAME.png`` (a path that also works
when a page is read on GitHub); the build adds those figures, and CHANGELOG.md as the changelog page,
from the repository itself, and rewrites such links to where the figures are served. A link to a
figure that does not exist is left alone, so the strict build still fails on it.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]
OUTSIDE = {"benchmarks/results": "*.png"}  # folders under the repository root whose files the pages show
PAGES = {"changelog.md": "CHANGELOG.md"}  # pages that are files of the repository root


def on_files(files, config):
    for folder, pattern in OUTSIDE.items():
        for path in sorted((ROOT / folder).rglob(pattern)):  # an example's own results folder too
            files.append(File.generated(config, f"{folder}/{path.relative_to(ROOT / folder).as_posix()}", abs_src_path=str(path)))
    for page, source in PAGES.items():
        files.append(File.generated(config, page, abs_src_path=str(ROOT / source)))
    return files


def on_page_markdown(markdown, page, config, files):
    depth = page.file.src_uri.count("/")
    served = {f.src_uri for f in files}

    def to_served(match):
        target = posixpath.normpath(posixpath.join(posixpath.dirname(page.file.src_uri), match.group(2)))
        if not target.startswith("../"):
            return match.group(0)
        inside = target[3:]
        if inside not in served:
            return match.group(0)
        return f"{match.group(1)}{'../' * depth}{inside})"

    return re.sub(r"(\]\()((?:\.\./)+[^)\s]+)\)", to_served, markdown)
