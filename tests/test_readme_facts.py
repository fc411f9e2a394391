"""The README names only what exists: its signatures, modules, files and command-line flags are checked against the
code, and its Layout lists every source file (a new module that the README does not mention fails here)."""

from __future__ import annotations

import ast
import importlib
import inspect
import itertools
import re
from pathlib import Path

import pytest

from erpo_fast import algorithms, config, engines, evaluate
from erpo_fast.kernels import fused_linear, sampling

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()

# Every call the README's python blocks show, and the object whose signature it documents.
DOCUMENTED = {
    "linear_logprobs": fused_linear.linear_logprobs,
    "linear_grpo_loss": fused_linear.linear_grpo_loss,
    "sample_tokens": sampling.sample_tokens,
    "LossSpec": algorithms.LossSpec,
    "make_engine": engines.make_engine,
    "engine.generate": engines.RolloutEngine.generate,
    "engine.update_weights": engines.RolloutEngine.update_weights,
    "engine.sleep": engines.RolloutEngine.sleep,
    "engine.wake_up": engines.RolloutEngine.wake_up,
}
USER_FUNCTIONS = {"my_reward"}  # examples of the user's own code


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def _call_args(text: str, start: int) -> str:
    depth, i = 0, start
    while True:
        depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(text[i], 0)
        if depth == 0:
            return text[start + 1:i]
        i += 1


def _split_top_level(args: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in args:
        depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return [p for p in parts + [cur.strip()] if p]


def _documented_calls() -> list[tuple[str, list[str]]]:
    calls = []
    for block in _python_blocks():
        code = "\n".join(line.split("#")[0] for line in block.splitlines())
        for m in re.finditer(r"(?<![\w.])(def\s+)?([A-Za-z_][\w.]*)\(", code):
            if m.group(1) is None:
                calls.append((m.group(2), _split_top_level(_call_args(code, m.end() - 1))))
    return calls


def test_every_documented_call_is_known():
    names = {name for name, _ in _documented_calls()}
    assert names, "no python blocks found in the README"
    assert names - USER_FUNCTIONS <= set(DOCUMENTED), names - USER_FUNCTIONS - set(DOCUMENTED)


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_readme_signature_is_the_code(name):
    documented = [args for n, args in _documented_calls() if n == name]
    assert documented, f"{name} is not shown in the README"
    params = [p for p in inspect.signature(DOCUMENTED[name]).parameters.values() if p.name != "self"]
    for args in documented:
        star = args.index("*") if "*" in args else None
        args = [a for a in args if a != "*"]
        shows_defaults = any("=" in a for a in args)
        if shows_defaults:  # a full signature: every parameter, in order
            assert len(args) == len(params), (name, args, [p.name for p in params])
        for i, (arg, param) in enumerate(zip(args, params)):
            if arg.startswith("**"):
                assert param.kind is param.VAR_KEYWORD and arg[2:] == param.name, (name, arg)
                continue
            keyword_only = star is not None and i >= star
            assert (param.kind is param.KEYWORD_ONLY) == keyword_only, (name, arg, param.kind)
            key, eq, default = arg.partition("=")
            if eq:
                assert key.strip() == param.name, (name, key, param.name)
                assert ast.literal_eval(default.strip()) == param.default, (name, arg, param.default)
            elif re.match(r"[A-Za-z_]\w*", arg):  # a named positional argument (a literal value names nothing)
                assert re.match(r"[A-Za-z_]\w*", arg).group() == param.name, (name, arg, param.name)


def _expand(token: str) -> list[str]:
    """'a/{b,c}.py' -> ['a/b.py', 'a/c.py']"""
    m = re.search(r"\{([^}]*)\}", token)
    if not m:
        return [token]
    return list(itertools.chain.from_iterable(
        _expand(token[:m.start()] + alt + token[m.end():]) for alt in m.group(1).split(",")))


def test_every_path_the_readme_names_exists():
    pattern = r"(?<![\w/.-])((?:erpo_fast|kernels|csrc|bench|tests|scripts|requirements)/[\w./{},*-]*)"
    paths = set(re.findall(pattern, README))
    assert len(paths) > 10
    for token in paths:
        for path in _expand(token.rstrip(".,")):
            assert list(ROOT.glob(path)) or (ROOT / path).exists(), path


def _layout_files() -> set[str]:
    section = README.split("## Layout")[1].split("\n## ")[0]
    block = next(b for b in re.findall(r"```\n(.*?)```", section, flags=re.S) if b.startswith("erpo_fast/"))
    named, folder = set(), ""
    for line in block.splitlines():
        if line and not line.startswith(" "):
            folder = line.split()[0]
        for token in re.findall(r"[\w/{},]+\.(?:py|cpp|cu|h|md)\b", line):
            named.update(path if path.startswith(folder) else folder + path for path in _expand(token))
    return named


def test_layout_lists_every_source_file():
    named = _layout_files()
    on_disk = {str(p.relative_to(ROOT)) for folder in ("erpo_fast", "kernels", "csrc", "bench")
               for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".cpp", ".cu", ".h")
               and p.name != "__init__.py" and "results" not in p.parts and "__pycache__" not in p.parts}
    on_disk.add("csrc/__init__.py")
    assert not on_disk - named, f"README Layout omits {sorted(on_disk - named)}"
    assert not named - on_disk - {"bench/NOTES.md"}, f"README Layout names missing files {sorted(named - on_disk)}"


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def test_every_module_and_object_the_readme_names_exists():
    names = set(re.findall(r"(?<![\w.])((?:erpo_fast|bench)(?:\.\w+)+)", README))
    assert "erpo_fast.algorithms.LossSpec" in names and "erpo_fast.tracker.HistoryTracker" in names
    missing = sorted(n for n in names if not _resolves(n))
    assert not missing, missing


OTHER_TOOLS = {"nproc_per_node", "no-deps"}  # torchrun's and pip's


def test_every_flag_the_readme_names_exists():
    train_cli = (ROOT / "erpo_fast" / "train.py").read_text()  # flags the trainer handles before the config
    train_flags = {"config", "preset", *config.ALIASES, *re.findall(r'"--([a-z][\w.-]*)"', train_cli)} | {
        f"{s}.{f.name}" for s in config.SECTIONS for f in config.dataclasses.fields(config._section_cls(s))}
    assert "help" in train_flags
    evaluate_flags = {opt[2:] for action in evaluate.make_parser()._actions for opt in action.option_strings}
    checked = 0
    for line in README.splitlines():
        if line.startswith("|"):  # tables name other trainers' options
            continue
        command = line.strip().startswith(("python -m erpo_fast", "torchrun", "--"))  # lines of bash blocks
        for span in re.findall(r"`([^`]*)`", line) + ([line.split("#")[0]] if command else []):
            for flag in re.findall(r"(?<![\w-])--([a-z][\w.-]*)", span):
                checked += 1
                script = re.match(r"\s*(?:\S*python\S* )?(?:-m )?(bench[/.]\w+)", span)
                if span.lstrip().startswith("python -m erpo_fast.evaluate"):
                    assert flag in evaluate_flags, (flag, line)
                elif script:  # a bench script's own flag: its argparse names it
                    source = (ROOT / (script.group(1).replace(".", "/") + ".py")).read_text()
                    assert f'"--{flag}"' in source, (flag, line)
                else:
                    assert flag in train_flags | evaluate_flags | OTHER_TOOLS, (flag, line)
    assert checked > 20


def test_shared_prompt_attention_limit_is_the_codes():
    from erpo_fast.packed_attention import _SUFFIX_MAX_RESPONSE

    match = re.search(r"while responses are at most (\d+) tokens", README)
    assert match and int(match.group(1)) == _SUFFIX_MAX_RESPONSE
