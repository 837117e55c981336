"""The README as the tests read it: its blocks, its commands and what its endpoint examples ask for
(tests/unit/test_docs.py, tests/integration/test_docs.py, tests/end_to_end/test_quickstart.py)."""
from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
# What the README's endpoint examples ask for: the quickstart's served name (workflows/quickstart.yaml's
# serve.model_name), its address and an image of the quickstart's data.
SERVED_NAME = "llava-quickstart"
WRITTEN_URL = "http://127.0.0.1:8000"
EXAMPLE_IMAGE = os.path.join("data", "quickstart", "images", "eval_000000.png")


def readme() -> str:
    with open(README) as f:
        return f.read()


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block of a markdown text."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```$", text, re.S | re.M)]


def validate_lines() -> list[str]:
    return [line.strip() for _, body in fenced_blocks(readme()) for line in body.splitlines()
            if line.strip().startswith("llava-ray validate ")]


def the_block(language: str, containing: str) -> str:
    found = [body for lang, body in fenced_blocks(readme()) if lang == language and containing in body]
    assert len(found) == 1, f"the README has {len(found)} {language} blocks with {containing!r}"
    return found[0]


def at(example: str, url: str) -> str:
    """An example with the endpoint's address in place of the written one (8000 may be taken on a shared machine)."""
    assert WRITTEN_URL in example
    return example.replace(WRITTEN_URL, url)


def serve_line() -> list[str]:
    """The README's `llava-ray serve ...` command, its arguments after `llava-ray` (its comment dropped)."""
    import shlex

    lines = [line for _, body in fenced_blocks(readme()) for line in body.splitlines()
             if line.strip().startswith("llava-ray serve ")]
    assert len(lines) == 1, lines
    return shlex.split(lines[0].split("#")[0])[1:]
