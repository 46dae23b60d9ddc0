"""Run Hugging Face transformers' Mamba models on shammie's kernels, on CPU and CUDA.

transformers routes every kernel call of its Mamba mixers through module-level functions of
`modeling_mamba` / `modeling_mamba2` (hub kernels or mamba_ssm when present, else a torch fallback: a
Python loop over the sequence). `use_shammie_kernels()` rebinds those names to shammie's ops:

- Mamba (`MambaForCausalLM`, `MambaModel`): training (`mamba_inner_fn`), prefill (`causal_conv1d_fn`
  + `selective_scan_fn` with the last state for the cache) and decode (`causal_conv1d_update` +
  `selective_state_update`).
- Mamba2 (`Mamba2ForCausalLM`, `Mamba2Model`): training (`mamba_split_conv1d_scan_combined`: conv,
  SSD scan, gated RMSNorm and out-projection), prefill (`causal_conv1d_fn` + `mamba_chunk_scan_combined`,
  with the start state of a chunked prefill and the final state for the cache) and decode
  (`causal_conv1d_update` + `selective_state_update`).
- The hybrids transformers generates from those mixers, which call the same functions: Falcon-Mamba,
  Jamba and Zamba (Mamba-1 blocks); Bamba, Falcon-H1, GraniteMoeHybrid, Nemotron-H and Zamba2
  (Mamba-2 blocks); and the short convolutions of LFM2 and Qwen3-Next.

Adapters (MoRe, peft's LoRA) on the projections whose weights the fused training paths take (x_proj,
out_proj) send a mixer to transformers' unfused path, which calls them; one on dt_proj is an error.
Under torch.compile only MoRe's adapters are seen (`_adapted` says why).

Call it once, or use it as a context manager; `restore()` (or leaving the `with`) undoes it.
"""

from __future__ import annotations

import importlib
import math
import sys

import torch

import shammie
from shammie.mamba_inner import mamba_inner_fn
from shammie.more.layer import adapts

_PACKED = ("seq_idx", "cu_seqlens")


def _no_packed_sequences(kwargs, name):
    for key in _PACKED:
        if kwargs.get(key) is not None:
            raise NotImplementedError(f"shammie's {name} does not support packed sequences ({key}=...)")


def _active_adapter(module) -> bool:
    return hasattr(module, "base_layer") and not getattr(module, "merged", False)


def _adapted(weights: dict) -> list:
    """The projections (name -> the weight transformers passed) that carry an active adapter. transformers'
    fused training paths take those weights, not the modules, so they would leave the adapter out. MoRe
    marks its base weights (`shammie.more.layer.adapts`), which torch.compile can read; in eager mode the
    calling mixer's modules also show any other adapter with a `base_layer` under it (peft's LoRA)."""
    names = [name for name, weight in weights.items() if adapts(weight)]
    if not torch.compiler.is_compiling():   # Dynamo cannot trace frame inspection
        mixer = sys._getframe(2).f_locals.get("self")   # the mixer whose method called the entry point
        names += [name for name in weights if name not in names and _active_adapter(getattr(mixer, name, None))]
    return names


def causal_conv1d_fn(hidden_states, weight, bias=None, activation=None, seq_idx=None, **kwargs):
    _no_packed_sequences(kwargs, "causal_conv1d_fn")   # seq_idx is honoured; cu_seqlens would not be
    x = hidden_states.to(weight.dtype)
    return shammie.causal_conv1d_fn(x, weight, bias, seq_idx=seq_idx, activation=activation).to(hidden_states.dtype)


def causal_conv1d_update(hidden_states, conv_state, weight, bias=None, activation=None, cache_seqlens=None,
                         conv_state_indices=None, **kwargs):
    x = hidden_states.to(weight.dtype)
    # A prefill in grad mode leaves a cache that requires grad (copied from activations); the decode
    # step writes it in place without a derivative, as mamba_ssm's kernels do, so it takes a detached
    # alias (same storage and version counter) rather than refusing.
    conv_state = conv_state.detach()
    # Under autocast the cache holds the activations' dtype (bf16) while the weights stay fp32: update
    # an fp32 copy and store it back rounded, as transformers' own path (conv_state.copy_) does.
    state = conv_state if conv_state.dtype == weight.dtype else conv_state.to(weight.dtype)
    out = shammie.causal_conv1d_update(x, state, weight, bias, activation, cache_seqlens=cache_seqlens,
                                       conv_state_indices=conv_state_indices)
    if state is not conv_state:
        conv_state.copy_(state)
    return out.to(hidden_states.dtype)


def selective_state_update(state, hidden_states, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, z=None,
                           state_batch_indices=None, **kwargs):
    _no_packed_sequences(kwargs, "selective_state_update")
    # detached: see causal_conv1d_update
    return shammie.selective_state_update(state.detach(), hidden_states, dt, A, B, C, D, z, dt_bias, dt_softplus,
                                          state_batch_indices=state_batch_indices)


def selective_scan(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, **kwargs):
    """transformers' `mamba_selective_scan` signature (its use_mambapy / use_associative_scan flags
    choose among torch fallbacks and do not apply)."""
    _no_packed_sequences(kwargs, "selective_scan_fn")
    return shammie.selective_scan_fn(hidden_states, dt, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def mamba2_chunk_scan(hidden_states, dt, A, B, C, chunk_size, D=None, dt_bias=None, initial_states=None,
                      dt_softplus=False, dt_limit=(0.0, math.inf), return_final_states=False, z=None, seq_idx=None,
                      cu_seqlens=None, return_varlen_states=False, **kwargs):
    """transformers' `mamba2_chunk_scan` signature (mamba_ssm's `mamba_chunk_scan_combined`)."""
    return shammie.mamba_chunk_scan_combined(hidden_states, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias,
                                             initial_states=initial_states, seq_idx=seq_idx, cu_seqlens=cu_seqlens,
                                             dt_softplus=dt_softplus, dt_limit=dt_limit,
                                             return_final_states=return_final_states,
                                             return_varlen_states=return_varlen_states)


def mamba2_split_conv1d_scan_combined(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size,
                                      initial_states=None, seq_idx=None, dt_limit=(0.0, math.inf),
                                      return_final_states=False, activation="silu", rmsnorm_weight=None,
                                      rmsnorm_eps=1e-6, outproj_weight=None, outproj_bias=None, headdim=None, ngroups=1,
                                      norm_before_gate=True, **kwargs):
    """transformers' fused Mamba2 training entry (mamba_ssm's `mamba_split_conv1d_scan_combined`). For an
    activation shammie's conv does not fuse, and for an adapter on out_proj (which the unfused path calls
    as a module), it returns None, which sends transformers to its unfused path."""
    if activation not in (None, "silu", "swish") or _adapted({"out_proj": outproj_weight}):
        return None
    _no_packed_sequences(kwargs, "mamba_split_conv1d_scan_combined")   # seq_idx is honoured; cu_seqlens is not
    return shammie.mamba_split_conv1d_scan_combined(
        zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, initial_states=initial_states,
        seq_idx=seq_idx, dt_limit=dt_limit, return_final_states=return_final_states, activation=activation,
        rmsnorm_weight=rmsnorm_weight, rmsnorm_eps=rmsnorm_eps, outproj_weight=outproj_weight,
        outproj_bias=outproj_bias, headdim=headdim, ngroups=ngroups, norm_before_gate=norm_before_gate)


def mamba_inner(*args, b_rms_weight=None, c_rms_weight=None, dt_rms_weight=None, **kwargs):
    """transformers' `mamba_inner_fn` (Mamba's training path). Returning None sends transformers to
    its unfused path (on shammie's conv and scan), for Falcon-Mamba's norms (the rms weights: its model
    normalizes dt before dt_proj, while mamba_ssm's fused function, and shammie's, normalize delta
    after) and for adapters on x_proj or out_proj, which that path calls as modules. It reads dt_proj's
    weight in either path, so an adapter there is an error rather than silently left out."""
    names = ("x_proj_weight", "delta_proj_weight", "out_proj_weight")   # mamba_ssm's positions 3, 4, 5
    given = [args[3 + i] if len(args) > 3 + i else kwargs.get(name) for i, name in enumerate(names)]
    adapted = _adapted(dict(zip(("x_proj", "dt_proj", "out_proj"), given)))
    if "dt_proj" in adapted:
        raise NotImplementedError(
            "the Mamba mixer's dt_proj carries an adapter, but transformers' Mamba mixer reads dt_proj.weight "
            "directly (in its fused and unfused paths), which would leave the adapter out; adapt in_proj, "
            "x_proj or out_proj instead")
    if any(w is not None for w in (b_rms_weight, c_rms_weight, dt_rms_weight)) or adapted:
        return None
    return mamba_inner_fn(*args, **kwargs)


# transformers' names for the kernel entry points -> shammie's replacement.
_REPLACEMENTS = {
    "causal_conv1d_fn": causal_conv1d_fn,
    "causal_conv1d_update": causal_conv1d_update,
    "mamba_inner_fn": mamba_inner,
    "mamba_selective_scan": selective_scan,
    "mamba_selective_state_update": selective_state_update,
    "mamba2_selective_state_update": selective_state_update,
    "mamba2_chunk_scan": mamba2_chunk_scan,
    "mamba2_split_conv1d_scan_combined": mamba2_split_conv1d_scan_combined,
}

# Mamba and Mamba2 must route every kernel through these names (else this transformers version is not
# one shammie knows). The other models below were generated from them by transformers' modular
# converter: the same functions, signatures and fallbacks (tests/test_hf_hybrids.py checks their
# logits, gradients and generations). A model missing from the installed version is skipped.
_REQUIRED = {
    "mamba": ("causal_conv1d_fn", "causal_conv1d_update", "mamba_inner_fn", "mamba_selective_scan",
              "mamba_selective_state_update"),
    "mamba2": ("causal_conv1d_fn", "causal_conv1d_update", "mamba2_selective_state_update", "mamba2_chunk_scan",
               "mamba2_split_conv1d_scan_combined"),
}
_HYBRIDS = ("falcon_mamba", "jamba", "zamba",                                           # Mamba-1 blocks
            "bamba", "falcon_h1", "granitemoehybrid", "nemotron_h", "zamba2",           # Mamba-2 blocks
            "lfm2", "qwen3_next")                                                       # short convs only


def _modules():
    """(module, names to patch) for every model above that this transformers version has."""
    found = []
    for model in (*_REQUIRED, *_HYBRIDS):
        try:
            module = importlib.import_module(f"transformers.models.{model}.modeling_{model}")
        except ModuleNotFoundError:
            if model in _REQUIRED:
                raise
            continue
        names = [name for name in _REPLACEMENTS if hasattr(module, name)]
        missing = [name for name in _REQUIRED.get(model, ()) if name not in names]
        if missing:
            raise RuntimeError(f"use_shammie_kernels: {module.__name__} lacks {', '.join(missing)}; this "
                               "transformers version routes its Mamba kernels differently")
        found.append((module, names))
    return found


# Live handles and what the patches replaced: transformers' own functions go back when the last live
# handle is restored, whatever the order (restoring a handle put back what it saw, which may have been
# another handle's patch, and left the modules patched after both were restored).
_live_handles = 0
_originals: list = []


class use_shammie_kernels:
    """Patch transformers' Mamba modules to call shammie's ops. Works as a call or a context manager:

        use_shammie_kernels()                 # from now on
        with use_shammie_kernels(): ...       # inside the block only

    Handles may overlap and be restored in any order: the patch stays while any of them is live.
    """

    def __init__(self):
        global _live_handles
        modules = _modules()
        if _live_handles == 0:
            _originals[:] = [(module, name, getattr(module, name)) for module, names in modules for name in names]
        for module, names in modules:
            for name in names:
                setattr(module, name, _REPLACEMENTS[name])
        _live_handles += 1
        self._live = True

    def restore(self) -> None:
        """Release this handle; the last live one puts transformers' own functions back. Idempotent."""
        global _live_handles
        if not self._live:
            return
        self._live = False
        _live_handles -= 1
        if _live_handles == 0:
            for module, name, original in reversed(_originals):
                setattr(module, name, original)
            _originals.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()
        return False


def is_patched() -> bool:
    module = importlib.import_module("transformers.models.mamba.modeling_mamba")
    return module.mamba_selective_scan is selective_scan


__all__ = ["use_shammie_kernels", "is_patched"]
