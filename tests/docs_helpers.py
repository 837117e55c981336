"""The README as the docs' tests read it (tests/unit/test_docs.py and tests/integration/test_docs.py)."""
from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def readme() -> str:
    with open(README) as f:
        return f.read()


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block of a markdown text."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```$", text, re.S | re.M)]


def validate_lines() -> list[str]:
    return [line.strip() for _, body in fenced_blocks(readme()) for line in body.splitlines()
            if line.strip().startswith("llava-ray validate ")]
