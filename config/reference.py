"""The configuration reference, docs/configuration.md, generated from `Settings`: every
environment variable with its type, default and description. A description is the docstring
under its field in config/__init__.py, a section's the docstring of its class, so the page is
edited there, never by hand.

`python -m config.reference` rewrites the page; tests/code/test_docs.py fails when it is stale.
"""

from __future__ import annotations

import ast
import inspect
import itertools
import json
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import annotated_types
from pydantic import AliasChoices, BaseModel
from pydantic.fields import FieldInfo

from config import REPO_ROOT, Settings

PAGE = REPO_ROOT / "docs" / "configuration.md"


@dataclass(frozen=True)
class Row:
    """One setting as the page shows it."""

    section: str | None  # None: a top-level setting
    field: str
    variables: tuple[str, ...]  # the environment variables that set it, the first the usual one
    types: tuple[str, ...]  # its alternatives: ("Path", "None")
    bounds: str  # "≥ 0, < 1", or ""
    default: str | None  # None: unset
    description: str


def field_docstrings(cls: type) -> dict[str, str]:
    """The string literal right under each `name: type = default` of a class body (an attribute
    docstring, as griffe and Sphinx read them), by field name; base classes' first."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not issubclass(klass, BaseModel) or klass.__module__.startswith("pydantic"):
            continue
        body = ast.parse(inspect.getsource(klass)).body[0].body
        for node, after in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def type_names(annotation: object) -> list[str]:
    """The alternatives of an annotation as a reader writes them: `["Path", "None"]`,
    `["list[int]"]`, `['"auto"', '"tvm"']`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return [json.dumps(arg) for arg in args]
    if origin in (typing.Union, types.UnionType):
        return [name for arg in args for name in type_names(arg)]
    if origin is not None:
        return [f"{origin.__name__}[{', '.join(' | '.join(type_names(arg)) for arg in args)}]"]
    return ["None" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))]


BOUNDS = {
    annotated_types.Ge: ("ge", "≥"),
    annotated_types.Gt: ("gt", ">"),
    annotated_types.Le: ("le", "≤"),
    annotated_types.Lt: ("lt", "<"),
}


def bounds(info: FieldInfo) -> str:
    """The field's numeric bounds, as `≥ 0, < 1`."""
    shown = []
    for item in info.metadata:
        for kind, (attribute, sign) in BOUNDS.items():
            if isinstance(item, kind):
                shown.append(f"{sign} {getattr(item, attribute)}")
    return ", ".join(shown)


def default_text(value: object) -> str | None:
    """The default as it would be written in the variable: JSON for lists and dicts, `true` for
    True, a path inside the checkout relative to it (`./data`); None for none."""
    if value is None:
        return None
    if isinstance(value, Path):
        return f"./{value.relative_to(REPO_ROOT)}" if value.is_relative_to(REPO_ROOT) else str(value)
    if isinstance(value, bool | list | dict):
        return json.dumps(value)
    return str(value)


def variables(section: str | None, name: str, info: FieldInfo) -> tuple[str, ...]:
    """The environment variables pydantic-settings reads for a field."""
    if isinstance(info.validation_alias, AliasChoices):
        return tuple(str(choice) for choice in info.validation_alias.choices)
    prefix, nested = Settings.model_config["env_prefix"], Settings.model_config["env_nested_delimiter"]
    path = f"{section}{nested}{name}" if section else name
    return (f"{prefix}{path}".upper(),)


def sections() -> dict[str | None, type[BaseModel]]:
    """The top-level settings (None) and each section, in the order `Settings` declares them."""
    found: dict[str | None, type[BaseModel]] = {None: Settings}
    for name, info in Settings.model_fields.items():
        if inspect.isclass(info.annotation) and issubclass(info.annotation, BaseModel):
            found[name] = info.annotation
    return found


def rows() -> list[Row]:
    """Every setting, section by section."""
    found = []
    for section, model in sections().items():
        docs = field_docstrings(model)
        for name, info in model.model_fields.items():
            if section is None and name in sections():
                continue
            found.append(
                Row(
                    section=section,
                    field=name,
                    variables=variables(section, name, info),
                    types=tuple(type_names(info.annotation)),
                    bounds=bounds(info),
                    default=default_text(info.default),
                    description=docs.get(name, ""),
                )
            )
    return found


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def page() -> str:
    """The whole page, markdown."""
    out = [
        "# Configuration",
        "",
        "<!-- Generated from config/__init__.py by `python -m config.reference`: edit the docstrings there. -->",
        "",
        "One typed configuration (`config/__init__.py`, pydantic-settings) read by `ml/`, `registry/`,",
        "`feedback/`, `bentos/`, `dags/` and `stack/`. Every setting is an environment variable:",
        "`INSECT_<FIELD>` at the top level, `INSECT_<SECTION>__<FIELD>` in a section; a misspelt",
        "variable of a section is an error, not silence. Lists and dicts are written as JSON, paths",
        "starting `./` are inside the checkout. `python -m config show` prints the effective settings",
        "(passwords in URLs as `***`). This page is generated from the docstrings under the fields",
        "(`python -m config.reference`); a test fails when it is stale.",
    ]
    by_section: dict[str | None, list[Row]] = {}
    for row in rows():
        by_section.setdefault(row.section, []).append(row)
    for section, model in sections().items():
        title = "Top level" if section is None else f"`{section}`"
        out += ["", f"## {title}", "", _cell(inspect.cleandoc(model.__doc__ or "")), ""]
        out += ["| variable | type | default | description |", "|---|---|---|---|"]
        for row in by_section[section]:
            names = " or ".join(f"`{name}`" for name in row.variables)
            default = "unset" if row.default is None else f"`{_cell(row.default)}`"
            kind = " or ".join(f"`{name}`" for name in row.types) + (f", {row.bounds}" if row.bounds else "")
            out.append(f"| {names} | {kind} | {default} | {_cell(row.description)} |")
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    """Write the page (or, with `--check`, exit 1 when the committed one is stale)."""
    text = page()
    if "--check" in argv:
        stale = not PAGE.exists() or PAGE.read_text() != text
        print(f"{PAGE.relative_to(REPO_ROOT)} is {'stale: run python -m config.reference' if stale else 'current'}")
        return int(stale)
    PAGE.write_text(text)
    print(f"wrote {PAGE.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
