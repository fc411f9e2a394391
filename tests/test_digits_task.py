"""The built-in digits task: reversed-digit sums checked against plain integer addition, disjoint splits."""

from __future__ import annotations

import re
from collections import Counter
from itertools import combinations_with_replacement

import pytest

from erpo_fast.config import ConfigError, build_config
from erpo_fast.tasks import builtin
from erpo_fast.tasks.arithmetic import make_splits as arithmetic_splits
from erpo_fast.tasks.digits import iter_level, level_size, make_problem, make_splits
from erpo_fast.tasks.digits import reward as digits_reward


def parse(prompt: str) -> tuple[int, int]:
    """Operands of a prompt, read back independently: "743+582=" -> (347, 285)."""
    match = re.fullmatch(r"([0-9]+)\+([0-9]+)=", prompt)
    assert match, prompt
    return int(match[1][::-1]), int(match[2][::-1])


def digit_count(n: int) -> int:
    return len(str(n))


def test_answers_are_the_reversed_sums():
    train, heldout, warm = make_splits(seed=1, num_train=300, num_heldout=60, levels=(1, 2, 3, 4, 5),
                                       num_warm_start=300)
    for p in train + heldout + warm:
        a, b = parse(p.prompt)
        # Level d: both operands have d digits (level 1: 0..9), so the reversed text has no trailing zero.
        assert digit_count(a) == digit_count(b) == p.level or (p.level == 1 and a < 10 and b < 10)
        assert int(p.answer[::-1]) == a + b and p.answer == str(a + b)[::-1]
        assert p.solution == p.answer and p.id == f"D{p.level}:{p.prompt[:-1]}"
        assert digits_reward(p.solution, p.answer) == 1.0


def test_worked_examples():
    assert (make_problem(347, 285, 3).prompt, make_problem(347, 285, 3).answer) == ("743+582=", "236")
    assert make_problem(315, 315, 3).answer == "036"  # 630: the units digit 0 comes first


@pytest.mark.parametrize("level", [1, 2])
def test_iter_level_enumerates_each_unordered_pair_once(level):
    lo, hi = (0, 9) if level == 1 else (10, 99)
    expected = {(a, b) for a, b in combinations_with_replacement(range(lo, hi + 1), 2)}
    problems = list(iter_level(level, seed=5))
    pairs = [tuple(sorted(parse(p.prompt))) for p in problems]
    assert len(pairs) == len(set(pairs)) == level_size(level) == len(expected)
    assert set(pairs) == expected


def test_splits_are_disjoint_also_under_mirroring():
    train, heldout, warm = make_splits(seed=0, num_train=1500, num_heldout=300, levels=(2, 3, 4),
                                       num_warm_start=3000)
    assert (len(train), len(heldout), len(warm)) == (1500, 300, 3000)
    unordered = [tuple(sorted(parse(p.prompt))) for p in train + heldout + warm]
    assert len(set(unordered)) == len(unordered)  # no problem twice, nor as b+a of another
    assert Counter(p.level for p in heldout) == {2: 100, 3: 100, 4: 100}


def test_level_one_is_capped_and_the_rest_spread():
    train, heldout = make_splits(seed=0, num_train=100, num_heldout=50, levels=(1, 2))
    assert Counter(p.level for p in heldout) == {1: 11, 2: 39}  # level 1 holds 55 problems: a fifth is 11
    assert Counter(p.level for p in train) == {1: 44, 2: 56}


def test_deterministic_in_seed_and_heldout_ignores_num_train():
    a = make_splits(seed=7, num_train=300, num_heldout=50)
    assert a == make_splits(seed=7, num_train=300, num_heldout=50)
    assert make_splits(seed=7, num_train=900, num_heldout=50)[1] == a[1]
    assert [p.prompt for p in make_splits(seed=8, num_train=300, num_heldout=50)[1]] != [p.prompt for p in a[1]]


@pytest.mark.parametrize("response, answer, expected", [
    ("236", "236", 1.0),
    ("236", "632", 0.0),
    ("the sum is 236", "236", 1.0),
    ("36", "036", 0.0),  # text, not value: the leading units digit 0 is part of the answer
    ("036", "036", 1.0),
    ("2 3 6", "236", 0.0),  # the last digit run is "6"
    ("236x", "236", 1.0),
    ("", "236", 0.0),
    ("٢٣٦", "236", 0.0),  # other scripts' digits are not ASCII digits
])
def test_reward(response, answer, expected):
    assert digits_reward(response, answer) == expected


def test_reward_rejects_a_non_digit_answer():
    with pytest.raises(ValueError, match="digit-string"):
        digits_reward("1", "-1")


def test_config_selects_the_task_and_levels():
    cfg = build_config(overrides={"builtin.task": "digits", "builtin.levels": "3,4", "builtin.num_train": 40,
                                  "builtin.num_heldout": 10})
    train, heldout, warm = builtin.splits(cfg.builtin, num_warm_start=20)
    assert {p.level for p in train + heldout + warm} == {3, 4}
    assert builtin.reward_name(cfg.builtin) == "digits"
    assert builtin.reward_name(build_config(overrides={"builtin.task": "arithmetic"}).builtin) == "arithmetic"
    assert build_config().builtin.task == "digits"  # the embedded default job's task (preset tiny-cpu)
    for bad in ("3,x", "3,3", "9"):
        with pytest.raises(ConfigError, match="builtin.levels"):
            builtin.levels(build_config(overrides={"builtin.task": "digits", "builtin.levels": bad}).builtin)
    with pytest.raises(ConfigError, match="builtin.task"):
        build_config(overrides={"builtin.task": "nope"})


def test_arithmetic_warm_start_examples_are_the_problems_a_larger_train_split_adds():
    cfg = build_config(overrides={"builtin.task": "arithmetic", "builtin.num_train": 100, "builtin.num_heldout": 20})
    train, heldout, warm = builtin.splits(cfg.builtin, num_warm_start=50)
    assert (train, heldout) == arithmetic_splits(seed=0, num_train=100, num_heldout=20)
    bigger, _ = arithmetic_splits(seed=0, num_train=150, num_heldout=20)
    assert warm == [p for p in bigger if p not in train][:50]
    assert not {p.prompt for p in warm} & {p.prompt for p in train + heldout}


def _tiny_model(seed=0):
    from erpo_fast.config import BuiltinConfig
    from erpo_fast.models import build_tiny_qwen2
    from erpo_fast.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    cfg = BuiltinConfig(hidden_size=32, layers=1, heads=2, kv_heads=1, intermediate_size=64)
    return tok, build_tiny_qwen2(tok, cfg, seed=seed)


def test_warm_start_stops_at_the_target_loss():
    import torch

    from erpo_fast.batch import RolloutSequence, pack_sequences
    from erpo_fast.kernels.fused_linear import linear_logprobs
    from erpo_fast.models import last_hidden_state, lm_head_weight
    from erpo_fast.warm_start import LOSS_WINDOW, supervised_finetune

    tok, model = _tiny_model()
    examples = [([5, 6, 7], [8, 9, tok.eos_token_id]), ([6, 5, 7], [9, 8, tok.eos_token_id])]
    loss, steps = supervised_finetune(model, examples, steps=2000, lr=1e-2, batch_size=4, seed=0, target_loss=0.5)
    assert LOSS_WINDOW <= steps < 2000 and loss < 0.5
    # The reported loss is the model's: an independent forward pass on the examples agrees it learnt them.
    batch = pack_sequences([RolloutSequence(*e, [], 1.0, 0.0, i) for i, e in enumerate(examples)], temperature=1.0)
    with torch.no_grad():
        hidden = last_hidden_state(model, batch.input_ids, batch.position_ids)[0, batch.label_index]
        assert -linear_logprobs(hidden, lm_head_weight(model), batch.target_ids, 1.0).mean() < 0.5
    # Without a target every step runs.
    _, model = _tiny_model()
    assert supervised_finetune(model, examples, steps=60, lr=1e-2, batch_size=4, seed=0)[1] == 60


def test_warm_start_decays_matrices_only():
    """AdamW's decay shrinks the projection matrices, never the norms or the (tied) embedding."""
    import torch

    from erpo_fast.warm_start import supervised_finetune

    tok, model = _tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    examples = [([5, 6, 7], [8, 9, tok.eos_token_id])]
    # lr tiny, decay huge: the update is the decay alone, p *= (1 - lr * wd) per step, to within Adam's step.
    supervised_finetune(model, examples, steps=10, lr=1e-6, batch_size=1, seed=0, weight_decay=1e4)
    for n, p in model.named_parameters():
        if p.ndim >= 2 and "embed" not in n:
            assert p.detach().norm() < 0.95 * before[n].norm(), n
        else:  # Adam moves each entry by at most ~lr per step
            torch.testing.assert_close(p.detach(), before[n], atol=1e-4, rtol=0, msg=n)
    assert torch.isfinite(torch.cat([p.detach().flatten() for p in model.parameters()])).all()


def test_warm_start_gives_up_on_a_stuck_start_and_restarts(tmp_path, monkeypatch, caplog):
    """A start still above warm_start_restart_loss after warm_start_restart_after steps is replaced by a new
    initialisation, within warm_start_steps in all; a start that gets below it is kept."""
    import logging

    from erpo_fast import warm_start
    from erpo_fast.config import BuiltinConfig

    tok, model = _tiny_model()
    examples = [([5, 6, 7], [8, 9, tok.eos_token_id])]
    assert warm_start.supervised_finetune(model, examples, steps=30, lr=1e-3, batch_size=2, seed=0,
                                          give_up=(10, 0.0))[1] == 10  # any loss is above 0: stuck
    assert warm_start.supervised_finetune(model, examples, steps=30, lr=1e-3, batch_size=2, seed=0,
                                          give_up=(10, 1e9))[1] == 30  # never stuck: runs on

    monkeypatch.setenv("ERPO_FAST_CACHE", str(tmp_path))
    inits = []
    real_build = warm_start.build_tiny_qwen2
    monkeypatch.setattr(warm_start, "build_tiny_qwen2", lambda tok, cfg, seed: inits.append(seed) or
                        real_build(tok, cfg, seed))
    cfg = BuiltinConfig(hidden_size=32, layers=1, heads=2, kv_heads=1, intermediate_size=64, seed=3,
                        warm_start_steps=12, warm_start_batch_size=2, warm_start_restart_after=5,
                        warm_start_restart_loss=1e-9)
    problems = make_splits(seed=0, num_train=4, num_heldout=2, levels=(1,), num_warm_start=8)[2]
    with caplog.at_level(logging.INFO, logger="erpo_fast"):
        path = warm_start.builtin_model_dir(cfg, True, lambda: problems)
    assert (path / "config.json").is_file()
    stride = warm_start.RESTART_SEED_STRIDE
    assert inits == [3, 3 + stride, 3 + 2 * stride]  # 5 steps, 5 steps, then the last 2 with no check left
    assert "12 SFT steps" in caplog.text and "(2 restart(s))" in caplog.text
