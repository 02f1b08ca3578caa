"""The README's pass list is generated from the registry and must stay in sync with it."""

from pathlib import Path

from slimfx.frontend.readme import BEGIN, END, passes_markdown

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_pass_list_matches_the_registry():
    text = README.read_text()
    section = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert section == passes_markdown(), "run `python -m slimfx.frontend.readme` to regenerate the README"


def test_readme_starts_with_the_two_commands():
    lines = [line for line in README.read_text().splitlines() if line.startswith("make ")]
    assert [line.split()[1] for line in lines[:2]] == ["demo", "test"]
