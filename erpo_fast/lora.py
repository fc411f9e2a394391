"""LoRA through peft: adapters in the learner's model, what an engine needs of them, and their PEFT-format files.

``model.lora_rank > 0`` injects peft's LoRA layers into the Hugging Face model in place
(``peft.inject_adapter_in_model``): the model keeps its class and its forward, each targeted linear becomes a
``peft`` ``Linear`` whose ``base_layer`` holds the frozen weight and whose ``lora_A`` / ``lora_B`` hold the
adapter, and only the adapters require grad. B starts at zero, so the injected policy equals the base.

An engine gets the policy one of two ways (``rollout.lora_sync``):

- merged (:func:`merged_weights`): ``W + (alpha / r) B A`` of every adapted layer, under the plain model's names
  (``...q_proj.weight``), copied into the engine's own weights. The other weights never change.
- adapters (:func:`adapter_weights`): the adapter tensors only; the engine applies them itself.

On disk (checkpoints, ``python -m erpo_fast.evaluate --adapter``) the adapters are a PEFT folder
(``adapter_config.json`` + ``adapter_model.safetensors``, keys ``base_model.model.<module>.lora_A.weight``), which
``peft.PeftModel.from_pretrained`` and vLLM's ``LoRARequest`` read as they are.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from erpo_fast.config import ModelConfig
from erpo_fast.errors import ConfigError, ModelLoadError, first_line

__all__ = ["ADAPTER_CONFIG", "MERGED_DIRNAME", "adapter_model_config", "adapter_weights", "adapters_off",
           "add_adapters", "dropout_active", "has_adapters", "is_adapter_dir", "load_adapters", "lora_config",
           "lora_layer_weight", "lora_layers", "merged_shapes", "merged_state_dict", "merged_weights",
           "read_adapter_config", "save_adapters", "set_dropout", "target_modules"]

ADAPTER_CONFIG = "adapter_config.json"
MERGED_DIRNAME = "merged"  # a LoRA checkpoint's model/merged/: the merged model (model.lora_merged_export)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts before the model's own module names
ADAPTER = "default"  # peft's name of the one adapter


def target_modules(cfg: ModelConfig) -> str | list[str]:
    """``model.lora_targets`` as peft takes it: ``"all-linear"`` or a list of module names."""
    targets = cfg.lora_targets.strip()
    modules = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    if not modules:
        raise ConfigError("model.lora_targets is empty: name the modules to adapt, or all-linear")
    return modules


def lora_config(cfg: ModelConfig):
    """The peft ``LoraConfig`` of the ``model.lora_*`` knobs."""
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=target_modules(cfg), bias="none")


def has_adapters(model: nn.Module) -> bool:
    return any(True for _ in lora_layers(model))


def lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(module name, peft LoRA layer)`` of every adapted layer, in module order."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def add_adapters(model: nn.Module, cfg: ModelConfig, seed: int = 0) -> None:
    """Inject LoRA adapters (B = 0: the policy is unchanged) into ``model`` in place and freeze everything else.
    A draws from a generator seeded with ``seed`` (the run's own: every rank, every run of one seed, the same A).
    A no-op when the model has them already. ConfigError for targets the model does not have."""
    if has_adapters(model):
        return
    from peft import inject_adapter_in_model

    config = lora_config(cfg)
    targets = config.target_modules
    if not isinstance(targets, str) and "lm_head" in targets and getattr(model.config, "tie_word_embeddings", False):
        raise ConfigError("model.lora_targets names lm_head, but this model ties it to the input embedding; "
                          "LoRA on a tied head is not supported (leave lm_head out)")
    try:
        with torch.random.fork_rng(devices=[]):  # peft initialises A from the global generator
            torch.manual_seed(seed)
            inject_adapter_in_model(config, model)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        raise ConfigError(f"model.lora_targets={cfg.lora_targets!r}: {first_line(e)}") from None
    for _, layer in lora_layers(model):
        if not isinstance(layer.base_layer, nn.Linear):
            raise ConfigError(f"model.lora_targets: {type(layer.base_layer).__name__} layers are not supported; "
                              "target linear layers only")


def lora_layer_weight(layer: nn.Module, full=lambda t: t) -> Tensor:
    """``W + scaling * B @ A`` of one LoRA layer (differentiable in A and B). ``full`` gathers a sharded
    tensor (the learner passes DTensor.full_tensor under FSDP2)."""
    base = full(layer.base_layer.weight)
    if layer.disable_adapters:
        return base
    return _merge(base, full(layer.lora_A[ADAPTER].weight), full(layer.lora_B[ADAPTER].weight), layer.scaling[ADAPTER])


def _merge(w: Tensor, a: Tensor, b: Tensor, scaling: float) -> Tensor:
    return w + (b.to(w.dtype) @ a.to(w.dtype)) * scaling


# Projections an engine may keep as one fused matrix (vLLM's qkv_proj and gate_up_proj): it reloads such a matrix
# whole, so an update naming one of them must name them all.
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def merged_weights(model: nn.Module, full=lambda t: t) -> Iterator[tuple[str, Tensor]]:
    """``(plain model name, weight)`` of every adapted layer, merged, plus the (frozen) weight of every projection
    fused with one of them: the tensors a merged-weights engine needs."""
    adapted = dict(lora_layers(model))
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, layer in adapted.items():
            yield f"{name}.weight", lora_layer_weight(layer, full)
        for name in _fused_siblings(adapted, modules):
            yield f"{name}.weight", full(modules[name].weight.detach())


def merged_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Name and (full) shape of every tensor :func:`merged_weights` yields, without computing any."""
    adapted = dict(lora_layers(model))
    modules = dict(model.named_modules())
    shapes = {f"{name}.weight": tuple(layer.base_layer.weight.shape) for name, layer in adapted.items()}
    shapes.update({f"{name}.weight": tuple(modules[name].weight.shape) for name in _fused_siblings(adapted, modules)})
    return shapes


def _fused_siblings(adapted: dict, modules: dict) -> list[str]:
    """Names of the projections that are not adapted but share a fused group with one that is."""
    out: dict[str, None] = {}  # ordered set
    for name in adapted:
        parent, _, short = name.rpartition(".")
        for group in FUSED_GROUPS:
            if short in group:
                out.update({f"{parent}.{s}": None for s in group
                            if f"{parent}.{s}" not in adapted and f"{parent}.{s}" in modules})
    return list(out)


def adapter_weights(model: nn.Module, full=lambda t: t) -> Iterator[tuple[str, Tensor]]:
    """``(the model's own parameter name, tensor)`` of every adapter tensor (``...lora_A.default.weight``)."""
    for name, p in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            yield name, full(p.detach())


def merged_state_dict(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A full state dict of the adapted ``model`` (peft's names, gathered) as the plain model's: every adapted
    weight merged, the adapters and the ``base_layer.`` level gone. For the Hugging Face export."""
    out = {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}
    with torch.no_grad():
        for name, layer in lora_layers(model):
            out[f"{name}.weight"] = _merge(out[f"{name}.weight"], state[f"{name}.lora_A.{ADAPTER}.weight"],
                                           state[f"{name}.lora_B.{ADAPTER}.weight"], layer.scaling[ADAPTER])
    return out


def set_dropout(model: nn.Module, *, active: bool) -> None:
    """Switch LoRA's own dropout (``lora_dropout``) on or off, whatever the model's train/eval mode."""
    for _, layer in lora_layers(model):
        for module in layer.lora_dropout.values():
            module.train(active)


@contextlib.contextmanager
def dropout_active(model: nn.Module):
    """LoRA's dropout on for the training forward (a no-op without adapters or with lora_dropout 0)."""
    set_dropout(model, active=True)
    try:
        yield
    finally:
        set_dropout(model, active=False)


@contextlib.contextmanager
def adapters_off(model: nn.Module):
    """The base model: every adapter switched off (the KL reference of a LoRA policy)."""
    layers = [layer for _, layer in lora_layers(model)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def peft_state_dict(named: Iterator[tuple[str, Tensor]]) -> dict[str, Tensor]:
    """The model's adapter tensors under PEFT's file keys (``base_model.model.<module>.lora_A.weight``)."""
    return {_PEFT_PREFIX + name.replace(f".{ADAPTER}.", "."): t for name, t in named}


def save_adapters(directory: str | Path, tensors: dict[str, Tensor], cfg: ModelConfig, *,
                  base_model: str | None) -> None:
    """Write a PEFT adapter folder from the adapter tensors (:func:`adapter_weights` names and tensors)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in peft_state_dict(iter(tensors.items())).items()}
    save_file(state, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = lora_config(cfg)
    # The module names actually adapted, not "all-linear": vLLM and older peft read a plain list.
    config.target_modules = sorted({name.split(".lora_")[0].rsplit(".", 1)[-1] for name in tensors})
    config.base_model_name_or_path = base_model
    config.save_pretrained(str(directory))


def is_adapter_dir(directory: str | Path) -> bool:
    return (Path(directory) / ADAPTER_CONFIG).is_file()


def read_adapter_config(directory: str | Path) -> dict:
    path = Path(directory) / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read the LoRA adapter config {path}: {first_line(e)}") from None
    if config.get("peft_type") != "LORA":
        raise ModelLoadError(f"{path} is not a LoRA adapter (peft_type={config.get('peft_type')!r})")
    return config


def adapter_model_config(directory: str | Path) -> ModelConfig:
    """The ``model.lora_*`` knobs an adapter folder was trained with (rank, alpha, targets)."""
    c = read_adapter_config(directory)
    targets = c.get("target_modules")
    targets = targets if isinstance(targets, str) else ",".join(targets or [])
    return ModelConfig(lora_rank=int(c["r"]), lora_alpha=float(c["lora_alpha"]), lora_targets=targets)


def load_adapters(model: nn.Module, directory: str | Path) -> None:
    """Load a PEFT adapter folder into a model that has the same adapters injected (:func:`add_adapters`);
    every adapter tensor must be there, with its shape. ModelLoadError otherwise."""
    from safetensors.torch import load_file

    path = Path(directory) / ADAPTER_WEIGHTS
    try:
        saved = load_file(str(path))
    except Exception as e:
        raise ModelLoadError(f"cannot load the LoRA adapters {path}: {first_line(e)}") from None
    own = dict(adapter_weights(model))
    expected = peft_state_dict(iter(own.items()))
    missing = sorted(set(expected) - set(saved))
    unknown = sorted(set(saved) - set(expected))
    if missing or unknown:
        what = f"lacks {missing[0]!r}" if missing else f"has {unknown[0]!r}, which the model does not"
        raise ModelLoadError(f"the LoRA adapters in {directory} do not fit this model and model.lora_* settings: "
                             f"the file {what}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for (name, _), key in zip(own.items(), expected):
            if saved[key].shape != params[name].shape:
                raise ModelLoadError(f"the LoRA adapters in {directory}: {key} has shape {tuple(saved[key].shape)}, "
                                     f"the model's is {tuple(params[name].shape)} (another lora_rank?)")
            params[name].copy_(saved[key])
