"""The README and the documentation site: the configuration page is generated from `config` and
current, every setting on it has a description and the variable that really sets it, and the
README stays a page whose links resolve. (`make test` also runs `mkdocs build --strict`, which
checks every link and cross-reference of the site.)"""

from __future__ import annotations

import re

import pytest
from markdown.extensions.toc import slugify
from pydantic import ValidationError
from pydantic_settings import SettingsError

from config import REPO_ROOT, Settings, reference

README = REPO_ROOT / "README.md"


def test_the_configuration_page_is_generated_from_config():
    assert reference.PAGE.read_text() == reference.page(), (
        "docs/configuration.md is stale: run `python -m config.reference` and commit the page"
    )


def test_every_setting_is_on_the_page_with_its_type_default_and_a_description():
    rows = reference.rows()
    page = reference.page()
    sections = {name for name in Settings.model_fields if name in reference.sections()}
    settings_count = sum(len(model.model_fields) for model in reference.sections().values()) - len(sections)
    assert len(rows) == settings_count
    for row in rows:
        where = f"{row.section}.{row.field}" if row.section else row.field
        assert row.description, f"{where} has no description: write a docstring under it in config/__init__.py"
        assert row.types and all(row.types), where
        line = next((line for line in page.splitlines() if line.startswith(f"| `{row.variables[0]}` ")), None)
        assert line, f"{row.variables[0]} is not on the page"
        assert ("unset" if row.default is None else f"`{row.default}`") in line
    for section, model in reference.sections().items():
        assert model.__doc__ and model.__doc__.strip(), f"section {section} has no docstring"
        assert section is None or f"## `{section}`" in page


def _read(settings: Settings, row: reference.Row) -> object:
    return getattr(getattr(settings, row.section), row.field) if row.section else getattr(settings, row.field)


@pytest.mark.parametrize("row", reference.rows(), ids=lambda row: row.variables[0])
def test_the_variable_the_page_names_sets_the_setting_and_its_default_reads_back(monkeypatch, row):
    """A value that cannot be the setting's is refused in the setting's name (text and paths, which
    take anything, arrive as sent); the default as the page writes it reads back as the default."""
    for variable in row.variables:
        monkeypatch.delenv(variable, raising=False)
    variable = row.variables[0]
    if row.types[0] in ("str", "Path"):
        monkeypatch.setenv(variable, "/from/the/page")
        assert str(_read(Settings(), row)) == "/from/the/page"
    else:
        complex_type = row.types[0].startswith(("list[", "dict["))  # JSON: a number is no list or dict
        monkeypatch.setenv(variable, "1" if complex_type else "{not a value")
        with pytest.raises(Exception, match=row.field) as refused:
            Settings()
        assert isinstance(refused.value, ValidationError | SettingsError)
    if row.default is not None and row.types[0] != "Path":  # a path on the page is relative to the checkout
        monkeypatch.setenv(variable, row.default)
        assert _read(Settings(), row) == reference.sections()[row.section].model_fields[row.field].default


def _links(markdown: str) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", markdown)


def test_the_readme_is_a_page_and_its_links_resolve():
    text = README.read_text()
    assert len(text.splitlines()) <= 200, "the README is the front page: move detail to a page under docs/"
    for link in _links(text):
        if link.startswith(("http://", "https://")):
            continue
        path, _, anchor = link.partition("#")
        target = REPO_ROOT / path
        assert target.exists(), f"README links {link}: no such file"
        if anchor:
            headings = [line.lstrip("#").strip() for line in target.read_text().splitlines() if line.startswith("#")]
            slugs = {slugify(re.sub(r"[`*]", "", heading), "-") for heading in headings}
            assert anchor in slugs, f"README links {link}: {path} has no such heading"


def test_the_readme_keeps_what_a_newcomer_needs():
    """The two commands and `make up`, the task table, the map of the code, the UIs, promotion,
    the API and scaling out; and every docs page linked from it."""
    text = README.read_text()
    for needed in ("make demo", "make test", "make up", "make docs", "| `validate_data` |", "## The code",
                   "## Open the UIs", "## Promote a model", "## Call the API", "## Scale out"):  # fmt: skip
        assert needed in text, needed
    pages = {path.name for path in (REPO_ROOT / "docs").glob("*.md")}
    linked = {link.partition("#")[0].removeprefix("docs/") for link in _links(text) if link.startswith("docs/")}
    assert pages - {"index.md"} <= linked, f"docs pages the README does not link: {pages - linked}"
