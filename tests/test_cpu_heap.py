"""trainer.cpu_heap: release unmaps freed activation-sized blocks (every new one is faulted in afresh), reuse keeps
them in the heap; auto picks by the memory plan's headroom; the session applies what it resolved."""

from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from erpo_fast import cpu_heap
from erpo_fast.config import build_config
from erpo_fast.distributed import init_runtime
from erpo_fast.session import build_session

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
BLOCK = 8 << 20  # bytes: between the release (1 MB) and reuse (32 MB) thresholds


def faults_of_a_repeated_block() -> int:
    """Minor page faults of allocating and writing a BLOCK-sized tensor right after an identical one was freed."""
    torch.empty(BLOCK // 4).fill_(1.0)  # allocated, written, freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(BLOCK // 4).fill_(2.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_auto_reuses_only_where_twice_the_predicted_peak_is_available():
    gb = 1 << 30
    assert cpu_heap.resolve("auto", peak=gb, budget=2 * gb) == "reuse"
    assert cpu_heap.resolve("auto", peak=gb, budget=2 * gb - 1) == "release"
    assert cpu_heap.resolve("auto", peak=gb, budget=None) == "release"  # unknown memory: keep the plan faithful
    assert cpu_heap.resolve("release", peak=1, budget=100 * gb) == "release"
    assert cpu_heap.resolve("reuse", peak=gb, budget=gb) == "reuse"
    with pytest.raises(ValueError, match="release or reuse"):
        cpu_heap.set_cpu_heap("auto")


@pytest.mark.skipif(not GLIBC, reason="mallopt thresholds are glibc's")
def test_release_faults_in_every_block_and_reuse_does_not():
    # A fresh process, switched as a training process is (release first, then the resolved mode): the heap of
    # this one holds whatever earlier tests left in it, which a request may be served from in either mode.
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from erpo_fast import cpu_heap
        from test_cpu_heap import faults_of_a_repeated_block
        assert cpu_heap.set_cpu_heap("release")
        release = [faults_of_a_repeated_block() for _ in range(3)]
        assert cpu_heap.set_cpu_heap("reuse")
        reuse = [faults_of_a_repeated_block() for _ in range(3)]
        print(json.dumps({{"release": release, "reuse": reuse}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    faults = json.loads(out.stdout.strip().splitlines()[-1])
    pages = BLOCK // resource.getpagesize()
    assert min(faults["release"]) >= 0.9 * pages, faults  # a fresh mapping each time: every page faulted, zeroed
    assert max(faults["reuse"][1:]) <= 0.05 * pages, faults  # the freed block's warm pages (the first grows the heap)


@pytest.mark.parametrize("mode, budget_gb, expect", [("auto", 1000.0, "reuse"), ("auto", 0.001, "release"),
                                                      ("release", 1000.0, "release")])
def test_the_session_applies_the_mode_it_resolved(tmp_path, monkeypatch, mode, budget_gb, expect):
    applied = []
    monkeypatch.setattr(cpu_heap, "set_cpu_heap", lambda m, real=cpu_heap.set_cpu_heap: applied.append(m) or real(m))
    cfg = build_config(overrides={
        "builtin.hidden_size": 32, "builtin.layers": 1, "builtin.heads": 2, "builtin.kv_heads": 1,
        "builtin.intermediate_size": 64, "builtin.warm_start_steps": 0, "builtin.num_train": 8,
        "builtin.num_heldout": 4, "trainer.prompts_per_step": 2, "trainer.device": "cpu", "trainer.cpu_heap": mode,
        "trainer.memory_budget_gb": budget_gb, "trainer.output_dir": str(tmp_path / mode),
        "data.reward_workers": 0, "logging.progress": False, "logging.plots": False})
    session = build_session(cfg, init_runtime("cpu"))
    session.close()
    assert applied == ["release", expect]  # the weights load under release; the plan's choice applies after
    if GLIBC:
        assert any(f"(trainer.cpu_heap {mode}: {expect})" in n for n in session.memory_plan.notes)


@pytest.mark.parametrize("mode, budget_gb, expect", [("auto", 1000.0, "reuse"), ("auto", 0.001, "release")])
def test_plan_cli_names_the_mode_a_run_would_take(capsys, mode, budget_gb, expect):
    from erpo_fast.memory_plan import main as plan_main

    plan_main(["--plan", "--trainer.device", "cpu", "--trainer.cpu_heap", mode,
               "--trainer.memory_budget_gb", str(budget_gb)])
    assert f"(trainer.cpu_heap {mode}: {expect})" in capsys.readouterr().out
