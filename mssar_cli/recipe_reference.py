"""The recipe field reference of docs/recipes.md, generated from the schema (``make fields``
rewrites it; a test checks it is current), so that the documentation cannot drift from the code."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import yaml

from mssar_cli.recipe import SECTIONS, type_name

REFERENCE_START, REFERENCE_END = "<!-- recipe-fields:start -->", "<!-- recipe-fields:end -->"


def field_reference() -> str:
    """Every recipe field as a Markdown table (section.key, type, default, help), generated from
    the schema so that the documentation cannot drift from it (``make fields`` rewrites it)."""
    lines = [
        "| key | type | default | meaning |",
        "|---|---|---|---|",
        "| `experiment` | a string | the file's stem | run directory name |",
    ]
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            )
            shown = "null" if default is None else yaml.safe_dump(default, default_flow_style=True)
            shown = shown.strip().removesuffix("...").strip()
            lines.append(
                f"| `{section}.{f.name}` | {type_name(hints[f.name])} | `{shown}` "
                f"| {f.metadata['help'].replace('|', chr(92) + '|')} |"
            )
    return "\n".join(lines) + "\n"


def with_field_reference(text: str) -> str:
    """``text`` (a Markdown document) with the block between the reference markers replaced."""
    start, end = text.index(REFERENCE_START), text.index(REFERENCE_END)
    return text[: start + len(REFERENCE_START)] + "\n" + field_reference() + text[end:]


# ``python -m mssar_cli.recipe_reference FILE.md``: rewrite the reference in FILE
if __name__ == "__main__":
    import sys

    target = Path(sys.argv[1])
    target.write_text(with_field_reference(target.read_text()))
