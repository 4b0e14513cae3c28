"""Writing a benchmark's figures into its own section of docs/performance.md.

Each benchmark owns one ``## <title>`` section and replaces only that one, up to the next
``## `` heading, so benchmarks run separately never erase each other's figures.
"""

from __future__ import annotations

from pathlib import Path


def replace_section(path: Path, title: str, body: str) -> None:
    text = path.read_text() if path.exists() else "# Performance\n"
    heading = f"## {title}\n"
    section = f"{heading}\n{body.strip()}\n\n"
    start = text.find(heading)
    if start < 0:
        text = text.rstrip() + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + section + (text[end + 1 :] if end >= 0 else "")
    path.write_text(text.rstrip() + "\n")
    print(f"wrote section {title!r} of {path}")
