"""Config tree: precedence (defaults < preset < YAML < CLI), typing, and one-line validation errors."""

import pytest

from erpo_fast.config import (
    PRESETS,
    Config,
    ConfigError,
    build_config,
    config_from_cli,
    help_text,
    parse_cli,
)


def test_default_is_tiny_cpu_preset():
    cfg = config_from_cli([])
    for section, values in PRESETS["tiny-cpu"].items():
        for key, value in values.items():
            assert getattr(getattr(cfg, section), key) == value


def test_precedence_yaml_then_cli(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("algorithm:\n  temperature_step: 0.3\n  ra: true\ntrainer:\n  max_steps: 7\n")
    cfg = config_from_cli(["--config", str(y), "--trainer.max_steps", "9", "--algorithm.eps_high=0.3"])
    assert cfg.algorithm.temperature_step == 0.3  # from YAML
    assert cfg.algorithm.ra is True  # YAML bool
    assert cfg.trainer.max_steps == 9  # CLI beats YAML
    assert cfg.algorithm.eps_high == 0.3


def test_aliases_and_bare_bool_flags():
    cfg = config_from_cli(["--max-steps", "3", "--resume", "--seed=5", "--output-dir", "/tmp/x", "--rollout", "native"])
    assert (cfg.trainer.max_steps, cfg.trainer.resume, cfg.trainer.seed) == (3, True, 5)
    assert cfg.trainer.output_dir == "/tmp/x" and cfg.rollout.engine == "native"
    cfg = config_from_cli(["--algorithm.erpo", "false", "--algorithm.dual_clip", "3"])
    assert cfg.algorithm.erpo is False and cfg.algorithm.dual_clip == 3.0
    assert config_from_cli(["--algorithm.dual_clip", "none"]).algorithm.dual_clip is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--algorithm.temprature_step", "0.1"], "did you mean 'algorithm.temperature_step'"),
        (["--max-step", "3"], "did you mean '--max-steps'"),
        (["--algoritm.ra", "true"], "unknown option --algoritm.ra"),
        (["--rollout.top_p", "1.5"], r"rollout.top_p=1.5 is out of range; allowed: > 0 and <= 1"),
        (["--trainer.max_steps", "0"], "trainer.max_steps=0 is out of range; allowed: >= 1"),
        (["--trainer.max_steps", "three"], "trainer.max_steps: expected int, got 'three'"),
        (["--algorithm.advantage", "ppo"], "choose one of: grpo, dr_grpo, rloo, reinforce_pp"),
        (["--algorithm.max_temperature", "0.9"], "must be >= algorithm.base_temperature"),
        (["--algorithm.dual_clip", "0.5"], "algorithm.dual_clip=0.5 is out of range; allowed: > 1"),
        (["--rollout.n", "1"], "need at least 2 responses"),
        (["--algorithm.logprob_temperature", "one"], "needs a truncated IS correction"),
        (["--model"], "option --model needs a value"),
        (["stray"], "unexpected argument 'stray'"),
        (["--preset", "tiny-gpu"], "unknown preset"),
        (["--config", "/nonexistent.yaml"], "config file not found"),
    ],
)
def test_errors_are_one_line_and_helpful(argv, message):
    with pytest.raises(ConfigError, match=message) as exc:
        config_from_cli(argv)
    assert "\n" not in str(exc.value)


def test_yaml_unknown_key_and_bad_yaml(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("rollout:\n  max_new_token: 16\n")
    with pytest.raises(ConfigError, match="did you mean .rollout.max_new_tokens."):
        build_config(yaml_path=y)
    y.write_text("rollout: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_config(yaml_path=y)
    y.write_text("modle:\n  path: x\n")
    with pytest.raises(ConfigError, match="did you mean 'model'"):
        build_config(yaml_path=y)


def test_round_trip_through_dict():
    cfg = config_from_cli(["--algorithm.ra", "true", "--trainer.lr", "3e-4"])
    again = build_config(saved=cfg.to_dict())  # as a resume rebuilds the checkpoint's config
    assert again == cfg
    assert isinstance(again, Config)


def test_parse_cli_separates_sources():
    preset, path, overrides = parse_cli(["--preset", "none", "--config", "a.yaml", "--data", "d.jsonl"])
    assert (preset, path, overrides) == ("none", "a.yaml", {"data.path": "d.jsonl"})


def test_help_lists_every_knob():
    text = help_text()
    assert "--algorithm.temperature_step 0.1:" in text
    assert text.count("--") >= 60


def test_builtin_knobs_moved_out_of_model_and_data(tmp_path):
    # The built-in task and tiny model have their own section; the old names stop a run with the new name ...
    for argv, new in ((["--model.tiny_layers", "2"], "builtin.layers"),
                      (["--model.warm_start_steps=5"], "builtin.warm_start_steps"),
                      (["--data.task_levels", "2,3"], "builtin.levels"), (["--data.seed", "1"], "builtin.seed")):
        with pytest.raises(ConfigError, match=rf"is now '{new}' \(command line\)"):
            config_from_cli(argv)
    y = tmp_path / "old.yaml"
    y.write_text("data:\n  num_train: 10\n")
    with pytest.raises(ConfigError, match=rf"'data.num_train' is now 'builtin.num_train' \({y}\)"):
        config_from_cli(["--config", str(y)])
    # ... while a run saved before the move resumes with its own values under the new names.
    saved = Config().to_dict()
    del saved["builtin"]
    saved["model"].update(tiny_layers=2, tiny_rope_theta=500.0, warm_start_steps=5, warm_start_target_loss=0.4)
    saved["data"].update(task="arithmetic", task_levels="2,3", seed=4, num_train=10, num_heldout=3)
    b = build_config(saved=saved).builtin
    assert (b.layers, b.rope_theta, b.warm_start_steps, b.warm_start_target_loss) == (2, 500.0, 5, 0.4)
    assert (b.task, b.levels, b.seed, b.num_train, b.num_heldout) == ("arithmetic", "2,3", 4, 10, 3)


def test_warm_start_cache_key_survives_the_move():
    # Models warm-started before the builtin section existed stay cached: the key hashes the knobs under the names
    # they had (written out here, not derived from MOVED).
    import hashlib
    import json

    import torch

    from erpo_fast import warm_start
    from erpo_fast.config import BuiltinConfig

    b = BuiltinConfig(layers=3, warm_start_lr=1e-3, task="arithmetic", levels="2", seed=5, num_train=30)
    old = {"tiny_hidden_size": 128, "tiny_layers": 3, "tiny_heads": 4, "tiny_kv_heads": 2,
           "tiny_intermediate_size": 384, "tiny_rope_theta": 10000.0, "warm_start_steps": 400,
           "warm_start_problems": 2000, "warm_start_lr": 1e-3, "warm_start_batch_size": 64,
           "warm_start_weight_decay": 0.1, "warm_start_restart_after": 0, "warm_start_restart_loss": 1.2,
           "warm_start_target_loss": 0.0, "num_train": 30, "num_heldout": 200, "seed": 5, "chat_template": True,
           "version": warm_start.CACHE_VERSION, "torch": torch.__version__, "task": "arithmetic", "task_levels": "2"}
    assert warm_start.warm_start_key(b, True) == hashlib.sha1(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
