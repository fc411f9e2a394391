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
