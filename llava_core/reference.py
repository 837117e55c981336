"""The schema's two documents: its JSON Schema (editors complete and check workflow keys) and the docs' tables.

The tables stand in the docs site's reference pages (docs/reference/), between their markers.

Both are generated from `llava_core/schema.py`, the one definition of every setting; tests fail when the committed
`workflows/schema.json` or the docs' tables differ from what this module generates. After changing a setting:

    python -m llava_core.reference --write      # rewrites workflows/schema.json and the tables in docs/reference/
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import typing
from typing import Any, Iterator

from pydantic import TypeAdapter
from pydantic.dataclasses import is_pydantic_dataclass
from pydantic_core import PydanticUndefined

from llava_core.schema import (
    PREFERENCE_DEFAULTS,
    PreferenceSettings,
    ServeSettings,
    TrainStageSettings,
    Workflow,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA_FILE = os.path.join("workflows", "schema.json")  # what the workflows' yaml-language-server line names
# Each table stands between its markers in one page of the docs site (mkdocs.yml).
TABLE_PAGES = {"workflow": os.path.join("docs", "reference", "workflow.md"),
               "stages": os.path.join("docs", "reference", "workflow.md"),
               "preference": os.path.join("docs", "reference", "workflow.md"),
               "serve": os.path.join("docs", "reference", "serve.md")}
STAGE_SECTIONS = ("align", "knowledge", "instruct", "preference")  # their keys get a table of their own


# --- JSON Schema --------------------------------------------------------------------------------------------------


def json_schema() -> dict:
    """The JSON Schema of a workflow file (draft 2020-12), without pydantic's generated titles."""
    schema = _untitled(TypeAdapter(Workflow).json_schema())
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "llava-ray workflow",
            "description": "A llava-ray workflow: prepare, align, [knowledge,] instruct, export, evaluate, serve. "
                           "Generated from llava_core/schema.py (python -m llava_core.reference --write).",
            **{k: v for k, v in schema.items() if k not in ("title", "description")}}


def _untitled(node: Any) -> Any:
    """Drop pydantic's `title` (the key in title case): editors show the key itself and the description."""
    if isinstance(node, dict):
        return {k: _untitled(v) for k, v in node.items() if not (k == "title" and isinstance(v, str))}
    if isinstance(node, list):
        return [_untitled(v) for v in node]
    return node


def json_schema_text() -> str:
    return json.dumps(json_schema(), indent=2) + "\n"


# --- Markdown tables ----------------------------------------------------------------------------------------------


def _bare(tp) -> tuple[Any, bool]:
    """(the type inside Annotated / Optional, whether it is Optional)."""
    optional = False
    while True:
        if typing.get_origin(tp) is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif typing.get_origin(tp) is typing.Union and type(None) in typing.get_args(tp):
            tp, optional = next(a for a in typing.get_args(tp) if a is not type(None)), True
        else:
            return tp, optional


def type_name(tp) -> str:
    tp, optional = _bare(tp)
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        name = " \\| ".join(_value(v) for v in typing.get_args(tp))
    elif origin is list:
        name = f"list of {type_name(typing.get_args(tp)[0])}"
    elif origin is dict:
        name = f"name: {type_name(typing.get_args(tp)[1])}" if typing.get_args(tp)[1] is not Any else "mapping"
    elif is_pydantic_dataclass(tp):
        name = "section"
    else:
        name = getattr(tp, "__name__", str(tp))
    return f"{name} or null" if optional else name


def _value(value: Any) -> str:
    """A default as it is written in YAML."""
    if dataclasses.is_dataclass(value):
        return ""
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    if value is None or isinstance(value, (bool, list, dict)):
        return f"`{json.dumps(value).replace(chr(34), '')}`"  # [projector, llm]: YAML's flow style
    return f"`{value}`"


def _default(info, section_default: Any, name: str) -> str:
    if section_default is not None:
        return _value(getattr(section_default, name))
    if info.default is PydanticUndefined and info.default_factory is None:
        return "required"
    return _value(info.get_default(call_default_factory=True))


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def rows(cls, prefix: str, defaults: Any = None, skip: tuple = ()) -> Iterator[tuple[str, str, str, str]]:
    """(key, type, default, meaning) of every setting of `cls` and of its subsections, depth first."""
    for name, info in cls.__pydantic_fields__.items():
        key = f"{prefix}{name}"
        tp, _ = _bare(info.annotation)
        yield key, type_name(info.annotation), _default(info, defaults, name), _cell(info.description or "")
        if name in skip:
            continue
        inner = tp
        if typing.get_origin(tp) is dict:
            inner, key = _bare(typing.get_args(tp)[1])[0], f"{key}.<name>"
        elif typing.get_origin(tp) is list:
            inner, key = _bare(typing.get_args(tp)[0])[0], f"{key}[]"
        if is_pydantic_dataclass(inner):
            yield from rows(inner, f"{key}.")


def _table(header: list[str], body) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(f"`{r[0]}`" if i == 0 else r[i] for i in range(len(r))) + " |" for r in body]
    return "\n".join(lines)


def workflow_table() -> str:
    body = rows(Workflow, "", skip=(*STAGE_SECTIONS, "serve"))
    return _table(["key", "type", "default", "meaning"], body)


def stage_table() -> str:
    """The keys of align / knowledge / instruct, with align's and instruct's defaults (knowledge takes the plain ones:
    it has no LLaVA defaults to keep)."""
    defaults = Workflow()
    align = list(rows(TrainStageSettings, "", defaults.align))
    instruct = list(rows(TrainStageSettings, "", defaults.instruct))
    body = [(a[0], a[1], a[2], i[2], a[3]) for a, i in zip(align, instruct)]
    return _table(["key", "type", "align default", "instruct default", "meaning"], body)


def preference_table() -> str:
    """The preference stage's own keys with its defaults (LLaVA-NeXT's DPO recipe); the training keys it shares
    with the other stages are in their table."""
    shared = set(TrainStageSettings.__pydantic_fields__)
    defaults = PreferenceSettings(**PREFERENCE_DEFAULTS)
    own = [r for r in rows(PreferenceSettings, "", defaults) if r[0].split(".")[0] not in shared]
    changed = [r for r in rows(PreferenceSettings, "", defaults) if r[0] in PREFERENCE_DEFAULTS]
    return _table(["key", "type", "default", "meaning"], own + changed)


def serve_table() -> str:
    return _table(["key", "type", "default", "meaning"], rows(ServeSettings, "serve."))


TABLES = {"workflow": workflow_table, "stages": stage_table, "preference": preference_table, "serve": serve_table}


def _marker(name: str) -> tuple[str, str]:
    return (f"<!-- BEGIN reference:{name} (generated from llava_core/schema.py by python -m llava_core.reference "
            f"--write; do not edit) -->", f"<!-- END reference:{name} -->")


def markdown() -> str:
    """Every table with its markers, as they stand in the docs' pages."""
    return "\n\n".join(f"{begin}\n{TABLES[name]()}\n{end}" for name in TABLES for begin, end in [_marker(name)])


def page_with_tables(path: str, text: str) -> str:
    """`text` (the page at `path`, relative to the repository) with each of its generated tables replaced by what the
    schema says now."""
    for name, table in TABLES.items():
        if TABLE_PAGES[name] != path:
            continue
        begin, end = _marker(name)
        pattern = re.compile(re.escape(begin) + r"\n.*?\n" + re.escape(end), re.S)
        if not pattern.search(text):
            raise ValueError(f"{path}: no {begin} ... {end} block")
        text = pattern.sub(lambda _: f"{begin}\n{table()}\n{end}", text)  # noqa: B023 - called here, not later
    return text


def write(root: str = ROOT) -> list[str]:
    """Rewrite the schema file and the docs' tables; returns the files that changed."""
    changed = []
    makers = [(SCHEMA_FILE, lambda old: json_schema_text())]
    makers += [(page, functools.partial(page_with_tables, page)) for page in sorted(set(TABLE_PAGES.values()))]
    for path, make in makers:
        full = os.path.join(root, path)
        old = open(full).read() if os.path.exists(full) else ""
        new = make(old)
        if new != old:
            with open(full, "w") as f:
                f.write(new)
            changed.append(path)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llava_core.reference", description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help=f"rewrite {SCHEMA_FILE} and the tables in docs/reference/")
    args = parser.parse_args(argv)
    if args.write:
        print("\n".join(write()) or "up to date")
    else:
        print(markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
