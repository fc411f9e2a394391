"""The kernels ship as `erpo_fast.kernels` (never as top-level `kernels`, which PyPI's HF kernel hub owns), and
import both from an installed wheel and from a plain source checkout."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROBE = ("import erpo_fast.kernels as k, erpo_fast.csrc as c, importlib.util as u; "
         "print(k.__file__); print(c.__file__); print(u.find_spec('kernels') is None); "
         "from erpo_fast.kernels import linear_logprobs, linear_grpo_loss, sample_tokens")


def _probe(pythonpath: Path, cwd: Path) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env={"PYTHONPATH": str(pythonpath), "PATH": ""},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()


@pytest.mark.slow
def test_wheel_layout_and_import(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            str(ROOT), "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("erpo_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "erpo_fast/kernels/__init__.py" in names
    assert "erpo_fast/kernels/fused_linear/chunked.py" in names
    assert "erpo_fast/csrc/sampling_cpu.cpp" in names and "erpo_fast/csrc/sampling_cuda.cu" in names
    assert not any(n.startswith(("kernels/", "csrc/")) for n in names)
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    kernels_file, csrc_file, no_top_level = _probe(tmp_path / "site", cwd=tmp_path)
    assert Path(kernels_file).is_relative_to(tmp_path / "site")
    assert Path(csrc_file).is_relative_to(tmp_path / "site")
    assert no_top_level == "True"


def test_source_checkout_import(tmp_path):
    # With the checkout itself on sys.path the folder is of course visible as `kernels`; what matters is that
    # erpo_fast maps it as erpo_fast.kernels and that no code of ours imports it under the bare name.
    kernels_file, csrc_file, _ = _probe(ROOT, cwd=tmp_path)
    assert Path(kernels_file) == ROOT / "kernels" / "__init__.py"
    assert Path(csrc_file) == ROOT / "csrc" / "__init__.py"


def test_no_code_imports_the_bare_kernels_name():
    offenders = []
    for path in [*ROOT.glob("erpo_fast/**/*.py"), *ROOT.glob("kernels/**/*.py"), *ROOT.glob("bench/*.py"),
                 *ROOT.glob("tests/*.py")]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            stripped = line.strip()
            if stripped.startswith(("import kernels", "from kernels")):
                offenders.append(f"{path.relative_to(ROOT)}:{number}")
    assert not offenders, offenders
