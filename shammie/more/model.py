"""Model-level MoRe: inject adapters into any PyTorch / Hugging Face model, count, merge, save, load."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from shammie.more.config import MoReConfig
from shammie.more.layer import MoReLinear, base_features
from shammie.version import __version__

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def _adapters(model: torch.nn.Module):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoReLinear)]


def _set_submodule(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def apply(model: torch.nn.Module, config: MoReConfig) -> torch.nn.Module:
    """Wrap every nn.Linear / Conv1D whose name matches `config.target_modules` in a MoReLinear,
    and freeze everything but the adapters, `modules_to_save` and (bias="all") the biases.
    Returns the model (changed in place). Applying again with another config adds its adapters (each
    layer keeps the geometry of the config that wrapped it first); save_adapter records every config."""
    configs = _configs_of(model, required=False)
    configs += [config] if config not in configs else []
    wrapped = [name for name, _ in _adapters(model)]
    targets = []
    for name, module in model.named_modules():
        if isinstance(module, MoReLinear) or not name or not config.matches(name):
            continue
        if any(name.startswith(t + ".") for t in wrapped + targets):   # inside an adapted layer
            continue
        try:
            base_features(module)
        except TypeError:
            continue
        _refuse_weight_read_directly(model, name)
        targets.append(name)
    if not targets and not _adapters(model):
        candidates = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"]
        raise ValueError(f"MoRe: no nn.Linear or Conv1D module matches target_modules={config.target_modules!r}; "
                         f"candidates include {candidates[:8]}")
    for name in targets:
        module = model.get_submodule(name)
        try:
            wrapped = MoReLinear(module, config.nblocks, config.blk_r, config.blk_sz, config.square, config.dropout)
        except ValueError as error:
            raise ValueError(f"{error} (module '{name}')") from None
        _set_submodule(model, name, wrapped)

    model._shammie_more_configs = configs
    trainable = _trainable_ids(model, configs)
    for param in model.parameters():
        param.requires_grad_(id(param) in trainable)
    return model


def _trainable_ids(model: torch.nn.Module, configs: list[MoReConfig]) -> set[int]:
    """ids of the parameters that train. Every name of a tied parameter counts, so modules_to_save=["lm_head"]
    trains GPT-2's lm_head although named_parameters() lists it only as transformer.wte.weight."""
    return {id(p) for name, p in model.named_parameters(remove_duplicate=False)
            if any(_is_trainable(name, c) for c in configs)}


def _refuse_weight_read_directly(model: torch.nn.Module, name: str) -> None:
    """transformers' Mamba mixers (a module with A_log, x_proj and dt_proj) compute dt_proj(·) as
    dt_proj.weight @ · in every path: an adapter on dt_proj would have no effect, so it is an error."""
    parent, _, leaf = name.rpartition(".")
    mixer = model.get_submodule(parent) if parent else model
    if leaf == "dt_proj" and all(hasattr(mixer, a) for a in ("A_log", "x_proj")):
        raise ValueError(f"MoRe: module '{name}' is a Mamba mixer's dt_proj, whose weight transformers reads "
                         "directly instead of calling the module, so an adapter there would have no effect; "
                         "adapt in_proj, x_proj or out_proj")


def _is_trainable(param_name: str, config: MoReConfig) -> bool:
    leaf = param_name.rpartition(".")[2]
    if leaf in ("L", "R"):
        return True
    if config.bias == "all" and leaf == "bias":
        return True
    parts = param_name.split(".")
    return any(".".join(parts[: i + 1]) == m or ".".join(parts[: i + 1]).endswith("." + m)
               for m in config.modules_to_save for i in range(len(parts)))


@dataclasses.dataclass
class ParameterCount:
    trainable: int
    total: int
    adapter: int
    lora_rank_equivalent: float   # the LoRA rank r with r·Σ(in + out) = adapter parameters

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f} "
                f"|| MoRe adapter params: {self.adapter:,} (= LoRA rank {self.lora_rank_equivalent:.2f})")


def trainable_parameters(model: torch.nn.Module) -> ParameterCount:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    adapters = _adapters(model)
    adapter = sum(m.L.numel() + m.R.numel() for _, m in adapters)
    widths = sum(m.in_features + m.out_features for _, m in adapters)
    return ParameterCount(trainable, total, adapter, adapter / widths if widths else 0.0)


def merge(model: torch.nn.Module) -> torch.nn.Module:
    """Fold each adapter's ΔW into its base weight (the adapters are then bypassed)."""
    adapters = _adapters(model)
    _refuse_tied_merge(model, adapters)
    for _, m in adapters:
        m.merge()
    return model


def _refuse_tied_merge(model: torch.nn.Module, adapters) -> None:
    """A base weight shared with another module (GPT-2's lm_head is wte's weight) cannot take ΔW: merging
    would change the input embedding too."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    for name, m in adapters:
        if m.merged:
            continue
        shared = [n for n in names.get(id(m.base_layer.weight), []) if n != f"{name}.base_layer.weight"]
        if shared:
            raise ValueError(f"MoRe: cannot merge the adapter on '{name}': its base weight is tied to {shared}, "
                             "which merging would change as well; keep this adapter unmerged, or untie the "
                             "weights before shammie.more.apply (e.g. tie_word_embeddings=False)")


def unmerge(model: torch.nn.Module) -> torch.nn.Module:
    """Subtract the folded ΔW again: the base weights return up to floating-point rounding."""
    for _, m in _adapters(model):
        m.unmerge()
    return model


def merge_and_unload(model: torch.nn.Module) -> torch.nn.Module:
    """Merge, then put the base layers back in place of the wrappers: a plain model again."""
    adapters = _adapters(model)
    _refuse_tied_merge(model, adapters)
    for name, m in adapters:
        m.merge()
        _set_submodule(model, name, m.base_layer)
    if hasattr(model, "_shammie_more_configs"):
        del model._shammie_more_configs
    return model


def adapter_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors under their model names (a tied parameter once, under its first name)."""
    trainable = _trainable_ids(model, _configs_of(model))
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if id(p) in trainable}


def _configs_of(model: torch.nn.Module, required: bool = True) -> list[MoReConfig]:
    configs = getattr(model, "_shammie_more_configs", None)
    if configs is None:
        legacy = getattr(model, "_shammie_more_config", None)   # pickled by shammie before it kept a list
        configs = [legacy] if legacy is not None else []
    if required and not configs:
        raise ValueError("MoRe: this model has no MoRe adapters (call shammie.more.apply first)")
    return list(configs)


def save_adapter(model: torch.nn.Module, directory: str | Path) -> None:
    """Write the adapter (and modules_to_save, trained biases) as safetensors plus its JSON config."""
    from safetensors.torch import save_file

    if any(m.merged for _, m in _adapters(model)):
        raise ValueError("MoRe: unmerge the model before saving its adapter")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    configs = [json.loads(c.to_json()) for c in _configs_of(model)]
    # One config keeps peft's flat layout; several (apply called more than once) are listed in order.
    text = configs[0] if len(configs) == 1 else {"method": "MoRe", "configs": configs}
    text["shammie_version"] = __version__
    (directory / CONFIG_NAME).write_text(json.dumps(text, indent=2))
    save_file(adapter_state_dict(model), str(directory / WEIGHTS_NAME))


def load_adapter(model: torch.nn.Module, directory: str | Path) -> torch.nn.Module:
    """Apply the saved config to a base model (if not applied yet) and load the saved weights."""
    from safetensors.torch import load_file

    directory = Path(directory)
    configs = _read_configs((directory / CONFIG_NAME).read_text())
    if not _configs_of(model, required=False):
        for config in configs:
            apply(model, config)
    if any(m.merged for _, m in _adapters(model)):  # unmerge would subtract the loaded ΔW, not the merged one
        raise ValueError("MoRe: unmerge the model before loading an adapter into it")
    expected = adapter_state_dict(model)
    saved = load_file(str(directory / WEIGHTS_NAME))
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise ValueError(f"MoRe: adapter in {directory} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in saved.items():
            if params[name].shape != value.shape:
                raise ValueError(f"MoRe: {name} has shape {tuple(value.shape)} in {directory}, the model expects {tuple(params[name].shape)}")
            params[name].copy_(value)
    return model


def _read_configs(text: str) -> list[MoReConfig]:
    data = json.loads(text)
    if "configs" not in data:
        return [MoReConfig.from_json(text)]
    if data.get("method", "MoRe") != "MoRe":
        raise ValueError("adapter config is not a MoRe config")
    return [MoReConfig.from_json(json.dumps(c)) for c in data["configs"]]
