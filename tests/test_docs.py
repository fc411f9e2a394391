"""The README's configuration reference is generated from the dataclasses; keep the two in sync."""

from pathlib import Path

from erpo_fast.config import markdown_reference

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"


def test_readme_config_reference_is_current():
    text = README.read_text()
    assert BEGIN in text and END in text
    documented = text.split(BEGIN)[1].split(END)[0].strip()
    assert documented == markdown_reference().strip(), (
        "README config reference is stale: regenerate it with `python -m erpo_fast.config`")
