"""MkDocs hook: the committed benchmark reports (benchmarks/*.md and their figures) become pages
of the site under `benchmarks/`, so a page links a report as `../benchmarks/LOAD.md`, the path
that also works on the repository's own file view. A link to a report that does not exist is
left as it is, and `mkdocs build --strict` fails on it."""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File, Files

REPO_ROOT = Path(__file__).resolve().parents[2]
REPORTS = REPO_ROOT / "benchmarks"
LINK = re.compile(r"\]\(((?:\.\./)+)benchmarks/([^)#\s]+)")


def on_files(files: Files, config) -> Files:
    for path in sorted(REPORTS.iterdir()):
        if path.suffix in {".md", ".png"}:
            files.append(File.generated(config, f"benchmarks/{path.name}", abs_src_path=str(path)))
    return files


def on_page_markdown(markdown: str, page, config, files: Files) -> str:
    depth = page.file.src_uri.count("/")  # folders between the page and docs/

    def into_site(match: re.Match) -> str:
        ups, name = match.group(1), match.group(2)
        if len(ups) // 3 != depth + 1 or not (REPORTS / name).is_file():
            return match.group(0)
        return f"]({'../' * depth}benchmarks/{name}"

    return LINK.sub(into_site, markdown)
