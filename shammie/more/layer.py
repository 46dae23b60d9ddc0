"""MoReLinear: a frozen linear layer plus a Monarch adapter, y = W x + b + M(dropout(x)).

M = blockdiag_butterfly_multiply with L (nblocks, blk_r, in_blksz) as w1 and R (nblocks,
out_blksz, blk_r) as w2; x is zero-padded to nblocks·in_blksz and M's output cut to out_features.
R starts at zero, so the adapted layer starts equal to the base layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from shammie.monarch import blockdiag_butterfly_multiply


def adapter_geometry(in_features: int, out_features: int, nblocks: int, blk_r: int,
                     blk_sz: int | None, square: bool) -> tuple[int, int, int, int]:
    """(nblocks, blk_r, in_blksz, out_blksz) for a layer; raises ValueError if impossible."""
    if nblocks > in_features:
        raise ValueError(f"MoRe: nblocks={nblocks} is more than in_features={in_features}")
    in_blksz = blk_sz or math.ceil(in_features / nblocks)
    if in_blksz > in_features:
        raise ValueError(f"MoRe: blk_sz={in_blksz} is more than in_features={in_features}")
    nblocks = math.ceil(in_features / in_blksz)
    out_blksz = math.ceil(in_blksz * out_features / in_features)
    rank = in_blksz if square else blk_r
    return nblocks, rank, in_blksz, out_blksz


def _base_weight_t(base: torch.nn.Module) -> torch.Tensor:
    """The base layer's weight as (in_features, out_features): nn.Linear's transposed, Conv1D's as is."""
    return base.weight.t() if isinstance(base, torch.nn.Linear) else base.weight


def base_features(base: torch.nn.Module) -> tuple[int, int]:
    if isinstance(base, torch.nn.Linear):
        return base.in_features, base.out_features
    if type(base).__name__ == "Conv1D" and base.weight.dim() == 2:   # transformers' GPT-2 Conv1D
        return base.weight.shape[0], base.weight.shape[1]
    raise TypeError(f"MoRe adapts nn.Linear and transformers' Conv1D, not {type(base).__name__}")


_ACTIVE_ADAPTER_MARK = "_shammie_more_adapter_active"


def adapts(weight: torch.Tensor) -> bool:
    """Whether `weight` is the base weight of a MoReLinear whose adapter is active (not merged): code
    that takes the weight instead of calling the layer would leave the adapter out."""
    return getattr(weight, _ACTIVE_ADAPTER_MARK, False)


class MoReLinear(torch.nn.Module):
    def __init__(self, base: torch.nn.Module, nblocks: int = 4, blk_r: int = 4, blk_sz: int | None = None,
                 square: bool = False, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base_features(base)
        self.base_layer = base
        base.weight.requires_grad_(False)
        self.nblocks, self.blk_r, self.in_blksz, self.out_blksz = adapter_geometry(
            self.in_features, self.out_features, nblocks, blk_r, blk_sz, square)
        factory = dict(device=base.weight.device, dtype=torch.float32 if base.weight.dtype not in (torch.float32, torch.float64) else base.weight.dtype)
        self.L = torch.nn.Parameter(torch.empty(self.nblocks, self.blk_r, self.in_blksz, **factory))
        self.R = torch.nn.Parameter(torch.zeros(self.nblocks, self.out_blksz, self.blk_r, **factory))
        self.dropout = torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity()
        self.merged = False
        self.reset_adapter()

    def reset_adapter(self) -> None:
        bound = 1.0 / math.sqrt(self.in_blksz)   # Kaiming-uniform per block (fan_in = in_blksz)
        with torch.no_grad():
            self.L.uniform_(-bound, bound)
            self.R.zero_()

    @property
    def merged(self) -> bool:
        return self._merged

    @merged.setter
    def merged(self, value: bool) -> None:
        # Marks the base weight while the adapter adds to it (see adapts); torch.compile can read it.
        self._merged = value
        setattr(self.base_layer.weight, _ACTIVE_ADAPTER_MARK, not value)

    def __setstate__(self, state):
        old_flag = state.pop("merged", False)   # pickled before `merged` was a property
        super().__setstate__(state)
        self.merged = state.get("_merged", old_flag)   # a copied base weight (copy.deepcopy) lost the mark

    # The frozen base layer's weight and bias, as peft's adapter layers expose them: code that reads a
    # projection's weight instead of calling it (transformers' fused Mamba training paths) then runs,
    # and shammie's transformers integration sends those paths to the unfused one, which calls the
    # adapter (shammie/integrations/transformers.py).
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def adapter_parameters(self) -> int:
        return self.nblocks * self.blk_r * (self.in_blksz + self.out_blksz)

    def adapter(self, x: torch.Tensor) -> torch.Tensor:
        """M(x): (..., in_features) -> (..., out_features), in x's dtype."""
        padded = self.nblocks * self.in_blksz
        if padded != self.in_features:
            x = F.pad(x, (0, padded - self.in_features))
        y = blockdiag_butterfly_multiply(x, self.L.to(x.dtype), self.R.to(x.dtype))
        return y[..., : self.out_features] if y.shape[-1] != self.out_features else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        delta = self.adapter(self.dropout(x))
        # The base product accumulates onto the adapter's output inside the GEMM (addmm's C),
        # so adding the adapter costs no extra pass over the output.
        out = torch.addmm(delta.reshape(-1, self.out_features), x.reshape(-1, self.in_features),
                          _base_weight_t(self.base_layer).to(x.dtype))
        if self.base_layer.bias is not None:
            out.add_(self.base_layer.bias.to(x.dtype))   # addmm's backward does not need its output
        return out.view(*x.shape[:-1], self.out_features)

    @torch.no_grad()
    def delta_weight_t(self) -> torch.Tensor:
        """ΔW as (in_features, out_features), built with the op from the identity (no dropout)."""
        eye = torch.eye(self.in_features, device=self.L.device, dtype=self.L.dtype)
        return self.adapter(eye)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            weight_t = _base_weight_t(self.base_layer)
            weight_t += self.delta_weight_t().to(weight_t.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            weight_t = _base_weight_t(self.base_layer)
            weight_t -= self.delta_weight_t().to(weight_t.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nblocks={self.nblocks}, "
                f"blk_r={self.blk_r}, in_blksz={self.in_blksz}, out_blksz={self.out_blksz}, merged={self.merged}")
