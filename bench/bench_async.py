"""Whole training runs side by side, alternated per seed: synchronous vs asynchronous (trainer.async_steps), and
the learner's other whole-run switches.

Each contender is a real ``python -m erpo_fast.train`` command (what a user runs), one after the other, the
order swapped every seed so that drift in the machine's speed falls on both:

- ``sync``: async_steps 0 with the job's own thread count (the default job: 1 thread);
- ``sync-2t``: async_steps 0 with 2 threads (both cores for whichever phase runs);
- ``async``: async_steps 1, one thread for the learner and one for the rollout process;
- ``async-2t``: async_steps 1, two learner threads beside the rollout process's one (3 threads on 2 cores);
- ``sync-release``, ``async-release``: ``sync`` and ``async`` with ``trainer.cpu_heap release`` (freed activation
  blocks unmapped, as before that knob existed; the other arms take its ``auto``);
- ``async-unpinned``: ``async`` with ``rollout.pin_cpus false`` (the scheduler places both processes);
- ``sync-every-sequence``, ``async-every-sequence``: ``sync`` and ``async`` with ``trainer.skip_zero_advantage
  false`` (the learner runs the sequences of uniform groups too, as before that knob existed; the other arms leave
  them out);
- ``torchrun2``, ``torchrun2-unbalanced``: ``sync`` under ``torchrun --nproc_per_node 2`` (two learner ranks,
  FSDP2 over gloo, one thread each), with ``trainer.balance_ranks`` on (the default) and off.

Jobs: ``default`` (the embedded default, preset tiny-cpu: 600 steps, warm-started model, held-out evaluation
every 150 steps) and ``B`` (model B of bench_vs_trl.py: 2 layers, 256 wide, Qwen's 152k vocabulary, 64 new
tokens, random weights and the parity reward; no evaluation). Per run: wall time of the command, the training
loop's steps/s (steps over the summed step times; evaluations excluded), the learner's summed time, the share of
sequences it left out (advantage exactly 0), under torchrun the mean ``rank_imbalance`` (the busiest rank's packed
tokens over the ranks' mean), the held-out mean@4 gain, and the peak RSS of the whole process tree (learner +
rollout process + helpers, every rank, sampled every 0.1 s).
Writes ``bench/results/async_<job>[_<steps>steps]-cpu.json``.

    python bench/bench_async.py --job default --seeds 0 1 2
    python bench/bench_async.py --job B --steps 30
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import device_name, git_commit, print_table, write_results  # noqa: E402
from erpo_fast.distributed import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ARMS = {"sync": {"trainer.async_steps": 0}, "sync-2t": {"trainer.async_steps": 0, "trainer.threads": 2},
        "async": {"trainer.async_steps": 1, "trainer.threads": 1, "rollout.threads": 1},
        "async-2t": {"trainer.async_steps": 1, "trainer.threads": 2, "rollout.threads": 1},
        # trainer.cpu_heap pinned (the arms above take auto, which is reuse for the default job on this machine)
        "sync-release": {"trainer.async_steps": 0, "trainer.cpu_heap": "release"},
        "async-release": {"trainer.async_steps": 1, "trainer.threads": 1, "rollout.threads": 1,
                          "trainer.cpu_heap": "release"},
        # the two processes left to the scheduler (the arms above pin them: rollout.pin_cpus, on by default)
        "async-unpinned": {"trainer.async_steps": 1, "trainer.threads": 1, "rollout.threads": 1,
                           "rollout.pin_cpus": "false"},
        # every sequence through the learner, zero-advantage ones too (the arms above leave those out)
        "sync-every-sequence": {"trainer.async_steps": 0, "trainer.skip_zero_advantage": "false"},
        "async-every-sequence": {"trainer.async_steps": 1, "trainer.threads": 1, "rollout.threads": 1,
                                 "trainer.skip_zero_advantage": "false"},
        # two learner ranks (torchrun, FSDP2 over gloo), the work handed out evenly before each update or not
        "torchrun2": {"trainer.async_steps": 0, "trainer.threads": 1},
        "torchrun2-unbalanced": {"trainer.async_steps": 0, "trainer.threads": 1, "trainer.balance_ranks": "false"}}
RANKS = {"torchrun2": 2, "torchrun2-unbalanced": 2}  # arms launched by torchrun, with this many processes


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants (Linux /proc)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")) * 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, StopIteration, ValueError):
            continue
    return total


def run(args: list[str], out: Path, ranks: int = 1) -> dict:
    launch = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                  str(ranks), "--master_port", str(free_port())]
    t0 = time.perf_counter()
    proc = subprocess.Popen([*launch, "-m", "erpo_fast.train", *args, "--output-dir", str(out),
                             "--logging.progress", "false"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    peak = [0]

    def poll():
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss_bytes(proc.pid))
            time.sleep(0.1)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    log, _ = proc.communicate()
    wall = time.perf_counter() - t0
    poller.join()
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}): {' '.join(args)}\n{log[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    before, after = summary.get("heldout_before", {}), summary.get("heldout_after", {})
    step_s = sum(r["time_step_s"] for r in records)
    row = {"wall_s": wall, "steps": len(records), "loop_steps_per_s": len(records) / step_s,
           "step_s_median": statistics.median(r["time_step_s"] for r in records),
           "rollout_s_median": statistics.median(r["time_rollout_s"] for r in records),
           "learn_s_median": statistics.median(r["time_learn_s"] for r in records),
           "learn_s_total": sum(r["time_learn_s"] for r in records),
           # the sequences the learner left out (advantage exactly 0) over those in the batches
           "zero_adv_skipped_frac": (sum(r.get("zero_adv_skipped", 0) for r in records)
                                     / max(1, sum(r.get("sequences_trained", 0) for r in records))),
           "wait_s_median": statistics.median(r.get("time_wait_rollout_s", 0.0) for r in records),
           "peak_rss_bytes": peak[0]}
    imbalance = [r["rank_imbalance"] for r in records if "rank_imbalance" in r]  # torchrun only
    if imbalance:
        row["rank_imbalance_mean"] = statistics.fmean(imbalance)
    key = next((k for k in after if k.startswith("mean_at_")), None)
    if key:
        row.update(heldout_before=before[key], heldout_after=after[key], heldout_gain=after[key] - before[key])
    return row


def job_args(job: str, seed: int, steps: int | None, root: Path) -> list[str]:
    if job == "default":
        return ["--seed", str(seed), *(["--max-steps", str(steps)] if steps else [])]
    from bench.bench_vs_trl import GROUP, PROMPTS_PER_STEP, build_assets

    assets = build_assets(job, root, prompts="fixed15")
    return ["--preset", "none", "--model", assets["model_dir"], "--data", assets["data"],
            "--data.reward", f"{ROOT / 'bench' / 'bench_vs_trl.py'}:parity_reward", "--data.reward_workers", "0",
            "--data.chat_template", "false", "--rollout.n", str(GROUP),
            "--rollout.max_new_tokens", str(assets["new_tokens"]), "--rollout.sync_check_every", "0",
            "--trainer.prompts_per_step", str(PROMPTS_PER_STEP), "--trainer.micro_batch_size", "32",
            "--trainer.lr", "1e-6", "--max-steps", str(steps or 30), "--trainer.eval_every", "0",
            "--trainer.save_every", "0", "--trainer.threads", "1", "--data.max_prompt_length", "15",
            "--trainer.device", "cpu", "--seed", str(seed), "--logging.plots", "false"]


def mean_se(values: list[float]) -> tuple[float, float]:
    m = statistics.fmean(values)
    return m, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job", default="default", choices=["default", "B"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=None, help="max_steps (default: the job's own; B: 30)")
    ap.add_argument("--arms", nargs="+", default=["sync", "async", "sync-2t"], choices=list(ARMS))
    ap.add_argument("--tag", default="", help="suffix of the results file's name (e.g. _heap)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="erpo-bench-async-") as tmp:
        tmp = Path(tmp)
        for i, seed in enumerate(args.seeds):
            order = args.arms if i % 2 == 0 else list(reversed(args.arms))
            for arm in order:
                extra = [a for k, v in ARMS[arm].items() for a in (f"--{k}", str(v))]
                out = tmp / f"{arm}-{seed}"
                row = {"arm": arm, "seed": seed,
                       **run(job_args(args.job, seed, args.steps, tmp) + extra, out, ranks=RANKS.get(arm, 1))}
                rows.append(row)
                print(json.dumps(row), flush=True)
    base = {r["seed"]: r for r in rows if r["arm"] == "sync"}
    table = []
    for arm in args.arms:
        mine = [r for r in rows if r["arm"] == arm]
        speed = [r["loop_steps_per_s"] / base[r["seed"]]["loop_steps_per_s"] for r in mine if r["seed"] in base]
        wall = [base[r["seed"]]["wall_s"] / r["wall_s"] for r in mine if r["seed"] in base]
        gain = [r["heldout_gain"] for r in mine if "heldout_gain" in r]
        entry = {"arm": arm, "runs": len(mine),
                 "loop_steps_per_s": statistics.median(r["loop_steps_per_s"] for r in mine),
                 "speedup_loop_vs_sync": statistics.median(speed) if speed else None,
                 "speedup_wall_vs_sync": statistics.median(wall) if wall else None,
                 "wall_s": statistics.median(r["wall_s"] for r in mine),
                 "learn_s_total": statistics.median(r["learn_s_total"] for r in mine),
                 "zero_adv_skipped_frac": statistics.median(r["zero_adv_skipped_frac"] for r in mine),
                 "rank_imbalance_mean": (statistics.median(r["rank_imbalance_mean"] for r in mine)
                                         if all("rank_imbalance_mean" in r for r in mine) else None),
                 "peak_rss_gb": statistics.median(r["peak_rss_bytes"] for r in mine) / 1e9}
        if gain:
            entry["heldout_gain_mean"], entry["heldout_gain_se"] = mean_se(gain)
        table.append(entry)
    print_table(table, list(table[0]), title=f"whole runs ({args.job} job, seeds {args.seeds})")
    path = write_results(f"async_{args.job}" + (f"_{args.steps}steps" if args.steps else "") + args.tag, {
        "job": args.job, "seeds": args.seeds, "steps": args.steps, "arms": {a: ARMS[a] for a in args.arms},
        "ranks": {a: RANKS.get(a, 1) for a in args.arms},
        "commit": git_commit(), "device": device_name("cpu"), "cpu_count": os.cpu_count(), "summary": table,
        "runs": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
