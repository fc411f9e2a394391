"""Our kernels are `erpo_fast.kernels` and never the top-level `kernels`, which PyPI's Hugging Face kernel hub
owns and transformers (>= 5.25) imports. Checked the four ways the package is reached: a plain source
checkout, the editable install (from the repository root and from elsewhere), and an installed wheel."""

import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The site-packages folders of the environment running the tests (third-party packages only when put on a
# path by hand: the .pth files in them, the editable install's hook among them, are processed only for site dirs).
SITE_DIRS = list(dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]))

PROBE = """
import importlib, json, sys
import erpo_fast, erpo_fast.csrc as c
from erpo_fast.kernels.fused_linear import linear_grpo_loss, linear_logprobs
from erpo_fast.kernels.sampling import sample_tokens
out = {"erpo_fast": erpo_fast.__file__, "csrc": c.__file__,
       "fused_linear": sys.modules["erpo_fast.kernels.fused_linear"].__file__,
       "kernels_path": list(sys.modules["erpo_fast.kernels"].__path__)}
try:
    top = importlib.import_module("kernels")
    out["kernels"] = getattr(top, "__file__", None)
    out["kernels_mark"] = getattr(top, "STAND_IN", None)
except ImportError:
    out["kernels"] = None
if "--transformers" in sys.argv:
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM  # imports HF `kernels` since 5.25
    out["transformers"] = [Qwen2ForCausalLM.__name__, LlamaForCausalLM.__name__]
print(json.dumps(out))
"""


def _probe(python: str, cwd: Path, *args: str, env: dict | None = None) -> dict:
    import json

    done = subprocess.run([python, *args, "-c", PROBE, *(["--transformers"] if "-S" not in args else [])],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _hf_kernels_installed() -> bool:
    try:
        metadata.distribution("kernels")
    except metadata.PackageNotFoundError:
        return False
    return True


def _inside(path: str | None, folder: Path) -> bool:
    return path is not None and Path(path).resolve().is_relative_to(folder.resolve())


@pytest.mark.skipif(not _hf_kernels_installed(), reason="Hugging Face `kernels` is not installed (see the lock)")
def test_repo_root_on_sys_path_gives_hf_kernels_to_transformers():
    # `python -c` puts the current directory first on sys.path, as `python -m erpo_fast.train` and pytest do.
    # Before the fix this failed: ImportError: cannot import name 'CUDAProperties' from 'kernels' (<repo>/kernels).
    got = _probe(sys.executable, ROOT)
    assert got["transformers"] == ["Qwen2ForCausalLM", "LlamaForCausalLM"]
    assert got["kernels"] is not None and not _inside(got["kernels"], ROOT / "kernels"), got
    assert Path(got["fused_linear"]) == ROOT / "kernels" / "fused_linear" / "__init__.py"


def test_a_regular_kernels_package_later_on_sys_path_wins_over_our_folder(tmp_path):
    # Holds whether or not HF `kernels` is installed: a stand-in regular package named `kernels`, placed after
    # the repository root on sys.path, is what `import kernels` gives.
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("STAND_IN = 'yes'\n")
    got = _probe(sys.executable, ROOT, "-S", env={"PYTHONPATH": ":".join([str(tmp_path), *SITE_DIRS]), "PATH": ""})
    assert got["kernels_mark"] == "yes"
    assert got["kernels"] == str(tmp_path / "kernels" / "__init__.py")


def test_plain_source_checkout_maps_the_folders(tmp_path):
    # -S: no site processing, so no installed or editable copy of erpo_fast; only the checkout on PYTHONPATH
    # and the third-party packages. erpo_fast's own import hook maps kernels/ and csrc/.
    got = _probe(sys.executable, tmp_path, "-S", env={"PYTHONPATH": ":".join([str(ROOT), *SITE_DIRS]), "PATH": ""})
    assert Path(got["erpo_fast"]) == ROOT / "erpo_fast" / "__init__.py"
    assert Path(got["csrc"]) == ROOT / "csrc" / "__init__.py"
    assert [Path(p) for p in got["kernels_path"]] == [ROOT / "kernels"]
    assert not _inside(got["kernels"], ROOT / "kernels"), got


def test_the_test_environment_from_another_directory(tmp_path):
    # The environment running the tests (the editable install of scripts/bootstrap.sh), started outside the
    # checkout: erpo_fast.kernels is still our folder and `kernels` is never it.
    got = _probe(sys.executable, tmp_path)
    assert _inside(got["fused_linear"], ROOT / "kernels")
    assert not _inside(got["kernels"], ROOT / "kernels"), got


@pytest.mark.slow
def test_wheel_installs_and_imports_in_a_clean_virtual_environment(tmp_path):
    # Built from a clean copy of the sources: setuptools reuses a checkout's build/lib, where a module that has
    # since been moved or deleted would still sit and go into the wheel.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", ".venv*", "*.egg-info", "__pycache__", "runs", "results", ".*cache"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            str(source), "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("erpo_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "erpo_fast/kernels/fused_linear/chunked.py" in names and "erpo_fast/kernels/sampling/naive.py" in names
    assert "erpo_fast/csrc/sampling_cpu.cpp" in names and "erpo_fast/csrc/sampling_cuda.cu" in names
    assert "erpo_fast/kernels/__init__.py" not in names  # a namespace package: nothing to shadow with
    assert not any(n.startswith(("kernels/", "csrc/")) for n in names)

    # A new virtual environment outside the checkout; the wheel goes in with pip, and the third-party packages
    # it needs come from this environment through a .pth file (instead of a second 1 GB install): a folder
    # named in a .pth file has its own .pth files ignored, so this environment's editable hook stays out.
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = str(env_dir / "bin" / "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "third_party.pth").write_text("\n".join(SITE_DIRS) + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
                              "--no-index", str(wheel)], capture_output=True, text=True, timeout=300)
    if install.returncode != 0 and "no such option: --python" in install.stderr:  # pip < 22.3
        install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                                  "--target", site, str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]

    outside = _probe(python, tmp_path)
    assert _inside(outside["erpo_fast"], Path(site)) and _inside(outside["csrc"], Path(site)), outside
    assert _inside(outside["fused_linear"], Path(site)), outside
    # From the repository root the checkout comes first on sys.path (plain Python), and still never as `kernels`.
    for got in (outside, _probe(python, ROOT)):
        assert got["transformers"] == ["Qwen2ForCausalLM", "LlamaForCausalLM"]
        if _hf_kernels_installed():
            assert got["kernels"] is not None and not _inside(got["kernels"], ROOT / "kernels"), got
    help_run = subprocess.run([python, "-m", "erpo_fast.train", "--help"], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)
    assert help_run.returncode == 0 and "--model" in help_run.stdout, help_run.stderr[-2000:]


def test_no_code_imports_the_bare_kernels_name():
    offenders = []
    for path in [*ROOT.glob("erpo_fast/**/*.py"), *ROOT.glob("kernels/**/*.py"), *ROOT.glob("bench/*.py"),
                 *ROOT.glob("tests/*.py")]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            stripped = line.strip()
            if stripped.startswith(("import kernels", "from kernels")):
                offenders.append(f"{path.relative_to(ROOT)}:{number}")
    assert not offenders, offenders


def test_kernels_folder_is_never_a_regular_package():
    assert not (ROOT / "kernels" / "__init__.py").exists()
