"""Manticore hybrids: the layers of M pretrained causal LMs cut into K contiguous blocks, run side by side at
each mixture position k and mixed with weights α_k on the simplex, through gated-residual projectors:

    h_m = (1 − α_km)·P_in_km(h) + α_km·fit_m(h),     y_m = blocks_km(h_m),
    h'  = Σ_m α_km·[(1 − α_km)·P_out_km(y_m) + α_km·pad(y_m)],

with h in the shared width d = max_m d_m (fit_m zero-pads or truncates to d_m, pad back to d). Embeddings and LM
heads stay per model and are mixed with α_1 (the first mixture's weights). Mamba blocks run on shammie's ops.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import operator
import os
from typing import Sequence

import torch
import torch.nn.functional as F

from shammie.manticore.components import component_for

PROJECTORS = ("linear", "linear_skip", "two_layer")
ALPHA_MODES = ("softmax", "gumbel", "gaea")


@dataclasses.dataclass
class ManticoreConfig:
    """n_mixtures: K, the number of mixture positions (each model's layers are cut into K contiguous blocks).
    projector: "linear" (identity init), "linear_skip" (identity + a zero-initialized linear) or "two_layer"
        (Linear–GELU–Linear, hidden width max(d_in, d_out), PyTorch's default init).
    alpha_mode: "softmax" (α_k = softmax(θ_k)), "gumbel" (Gumbel-softmax samples of θ_k at temperature `tau`
        in training mode, softmax in eval mode) or "gaea" (α_k kept on the simplex by exponentiated-gradient
        updates, see `ExponentiatedGradient`).
    vocab_maps: per model, None (the model's own vocabulary is the shared one) or a list mapping each shared
        token id to that model's token id.
    shammie_kernels: run Mamba and Mamba2 blocks on shammie's ops (False: transformers' torch path).
    """

    n_mixtures: int = 4
    projector: str = "linear_skip"
    alpha_mode: str = "softmax"
    tau: float = 1.0
    vocab_maps: list | None = None
    shammie_kernels: bool = True
    programmed: list | None = None    # α set by program(), else None

    def __post_init__(self):
        try:
            self.n_mixtures = operator.index(self.n_mixtures)   # numpy / torch integers too
        except TypeError:
            raise ValueError(f"ManticoreConfig: n_mixtures must be a positive int, got {self.n_mixtures!r}") from None
        if self.vocab_maps is not None:   # plain lists of ints: the config is saved as JSON
            self.vocab_maps = [None if v is None else [operator.index(i) for i in _as_list(v)] for v in self.vocab_maps]
        if self.projector not in PROJECTORS:
            raise ValueError(f"ManticoreConfig: projector must be one of {PROJECTORS}, got {self.projector!r}")
        if self.alpha_mode not in ALPHA_MODES:
            raise ValueError(f"ManticoreConfig: alpha_mode must be one of {ALPHA_MODES}, got {self.alpha_mode!r}")
        if self.n_mixtures < 1:
            raise ValueError(f"ManticoreConfig: n_mixtures must be a positive int, got {self.n_mixtures!r}")
        if not self.tau > 0:
            raise ValueError(f"ManticoreConfig: tau must be > 0, got {self.tau}")


def _as_list(v) -> list:
    return v.tolist() if hasattr(v, "tolist") else list(v)


def _fit(x: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad or truncate the last dimension to `width`."""
    d = x.shape[-1]
    if d == width:
        return x
    return x[..., :width] if d > width else F.pad(x, (0, width - d))


class Projector(torch.nn.Module):
    """d_in -> d_out translation of features; starts as fit() (identity on the shared coordinates) except
    two_layer."""

    def __init__(self, kind: str, d_in: int, d_out: int):
        super().__init__()
        self.kind, self.d_out = kind, d_out
        if kind == "two_layer":
            hidden = max(d_in, d_out)
            self.net = torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, d_out))
            return
        self.net = torch.nn.Linear(d_in, d_out)
        with torch.no_grad():
            self.net.bias.zero_()
            if kind == "linear":
                self.net.weight.copy_(torch.eye(d_out, d_in))
            else:
                self.net.weight.zero_()

    def forward(self, x):
        x = x.to(self.net[0].weight.dtype if self.kind == "two_layer" else self.net.weight.dtype)
        y = self.net(x)
        return y + _fit(x, self.d_out) if self.kind == "linear_skip" else y


def _split(n_layers: int, k: int) -> list[range]:
    """n_layers cut into k contiguous, nearly equal blocks (the first ones one longer)."""
    q, r = divmod(n_layers, k)
    bounds = [0]
    for i in range(k):
        bounds.append(bounds[-1] + q + (i < r))
    return [range(bounds[i], bounds[i + 1]) for i in range(k)]


class Manticore(torch.nn.Module):
    """A hybrid of HF causal LMs. Build it with `Manticore.from_models([gpt2, mamba], n_mixtures=4, ...)`;
    `forward(input_ids, labels=None)` returns `(logits, loss)` with HF's shifted next-token loss."""

    def __init__(self, models: Sequence[torch.nn.Module], config: ManticoreConfig):
        super().__init__()
        if len(models) < 1:
            raise ValueError("Manticore: pass at least one model")
        if len({id(m) for m in models}) != len(models):
            raise ValueError("Manticore: the same model object is passed twice; its blocks would share weights "
                             "(and a saved hybrid could not be loaded): pass a copy.deepcopy of it instead")
        self.config = config
        self.models = torch.nn.ModuleList(models)
        self.components = [component_for(m) for m in models]
        self.width = max(c.width for c in self.components)
        K, M = config.n_mixtures, len(models)
        for i, c in enumerate(self.components):
            n = len(c.blocks)
            if n < K:
                raise ValueError(f"Manticore: model {i} ({c.kind}) has {n} layers, fewer than n_mixtures={K}")
        self.splits = [_split(len(c.blocks), K) for c in self.components]
        self.vocab_size = self._check_vocab(config.vocab_maps)
        for i, vmap in enumerate(config.vocab_maps or [None] * M):
            self.register_buffer(f"vocab_map_{i}", None if vmap is None else torch.tensor(vmap, dtype=torch.long),
                                 persistent=False)
        d = self.width
        self.proj_in = torch.nn.ModuleList([torch.nn.ModuleList([Projector(config.projector, d, c.width)
                                                                 for c in self.components]) for _ in range(K)])
        self.proj_out = torch.nn.ModuleList([torch.nn.ModuleList([Projector(config.projector, c.width, d)
                                                                  for c in self.components]) for _ in range(K)])
        init = torch.full((K, M), 1.0 / M) if config.alpha_mode == "gaea" else torch.zeros(K, M)
        self.alpha = torch.nn.Parameter(init)     # θ (softmax, gumbel) or α itself (gaea)
        self.register_buffer("alpha_programmed", torch.zeros(K, M))
        self._host_alpha = None                    # programmed α as Python floats (decides bypasses, no device sync)
        if config.programmed is not None:
            self.program(config.programmed)

    # -- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_models(cls, models: Sequence[torch.nn.Module], **kwargs) -> "Manticore":
        """kwargs: the fields of ManticoreConfig (n_mixtures, projector, alpha_mode, tau, vocab_maps, ...)."""
        config = ManticoreConfig(**kwargs)
        models = list(models)
        if not models:
            raise ValueError("Manticore: pass at least one model")
        ref = next(iter(models[0].parameters()))
        hybrid = cls(list(models), config).to(device=ref.device)
        hybrid.proj_in.to(dtype=ref.dtype)     # projectors in the models' dtype; α stays float32
        hybrid.proj_out.to(dtype=ref.dtype)
        return hybrid

    def _check_vocab(self, vocab_maps) -> int:
        M = len(self.components)
        sizes = [c.vocab_size for c in self.components]
        if vocab_maps is None:
            if len(set(sizes)) != 1:
                desc = ", ".join(f"model {i} ({c.kind}): {s}" for i, (c, s) in enumerate(zip(self.components, sizes)))
                raise ValueError(f"Manticore: the models' vocabularies differ ({desc}); pass vocab_maps=[...] mapping "
                                 "each shared token id to each model's token id (None for a model whose vocabulary "
                                 "is the shared one)")
            return sizes[0]
        if len(vocab_maps) != M:
            raise ValueError(f"Manticore: vocab_maps has {len(vocab_maps)} entries, expected one per model ({M})")
        shared = {len(v) if v is not None else sizes[i] for i, v in enumerate(vocab_maps)}
        if len(shared) != 1:
            raise ValueError(f"Manticore: vocab_maps imply different shared vocabulary sizes {sorted(shared)}; every "
                             "map (and every model without one) must cover the same shared vocabulary")
        for i, v in enumerate(vocab_maps):
            if v is not None and (min(v) < 0 or max(v) >= sizes[i]):
                raise ValueError(f"Manticore: vocab_maps[{i}] holds ids outside model {i}'s vocabulary [0, {sizes[i]})")
        return shared.pop()

    # -- mixture weights -------------------------------------------------------------------------------------
    @property
    def programmed(self) -> bool:
        return self._host_alpha is not None

    def mixture_weights(self) -> torch.Tensor:
        """α, shape (n_mixtures, n_models), each row on the simplex."""
        if self.programmed:
            return self.alpha_programmed
        if self.config.alpha_mode == "gaea":
            return self.alpha
        if self.config.alpha_mode == "gumbel" and self.training:
            return F.gumbel_softmax(self.alpha, tau=self.config.tau, hard=False, dim=-1)
        return torch.softmax(self.alpha, dim=-1)

    def program(self, alphas) -> None:
        """Fix α by hand: a (n_mixtures, n_models) table of rows on the simplex. One-hot rows run the chosen
        model's blocks exactly as in that model (projectors bypassed, other models skipped)."""
        a = torch.as_tensor(alphas, dtype=torch.float64).cpu()
        shape = tuple(self.alpha.shape)
        if tuple(a.shape) != shape:
            raise ValueError(f"Manticore.program: alphas must have shape (n_mixtures, n_models) = {shape}, "
                             f"got {tuple(a.shape)}")
        if (a < 0).any() or not torch.allclose(a.sum(-1), torch.ones(shape[0], dtype=a.dtype), atol=1e-6):
            raise ValueError(f"Manticore.program: each row of alphas must be on the simplex (>= 0, sums to 1); got "
                             f"{a.tolist()}")
        self._host_alpha = a.tolist()
        self.config.programmed = self._host_alpha
        with torch.no_grad():
            self.alpha_programmed.copy_(a.to(self.alpha_programmed.dtype))

    def unprogram(self) -> None:
        """Make α searchable again, starting from the programmed values."""
        if not self.programmed:
            return
        a = self.alpha_programmed.detach()
        with torch.no_grad():
            self.alpha.copy_(a if self.config.alpha_mode == "gaea" else a.clamp_min(1e-6).log())
        self._host_alpha = None
        self.config.programmed = None

    def discretize(self) -> list[int]:
        """Program the argmax of α at each position (the hybrid the search chose); returns the model indices."""
        with torch.no_grad():
            chosen = self.mixture_weights().argmax(-1).tolist() if not self.programmed else \
                [max(range(len(r)), key=r.__getitem__) for r in self._host_alpha]
        self.program(F.one_hot(torch.tensor(chosen), len(self.components)).double())
        return chosen

    def alphas(self) -> str:
        """α as a readable table: one row per mixture position, one column per model."""
        with torch.no_grad():
            was = self.training
            self.eval()            # Gumbel mode shows the expected weights, not a sample
            a = self.mixture_weights().detach().float().cpu()
            self.train(was)
        names = [f"{i}:{c.kind}" for i, c in enumerate(self.components)]
        width = max(10, *(len(n) for n in names))
        lines = ["mixture  layers".ljust(24) + "".join(n.rjust(width + 2) for n in names)]
        for k in range(a.shape[0]):
            layers = "/".join(f"{s[k].start}-{s[k].stop - 1}" for s in self.splits)
            lines.append(f"{k:<9}{layers:<15}" + "".join(f"{v:{width + 2}.4f}" for v in a[k].tolist()))
        mode = "programmed" if self.programmed else self.config.alpha_mode
        lines.append(f"({mode}; embeddings and LM heads use mixture 0's weights)")
        return "\n".join(lines)

    # -- forward ---------------------------------------------------------------------------------------------
    def _kernels(self):
        if self.config.shammie_kernels and any(c.kind in ("mamba", "mamba2") for c in self.components):
            from shammie.integrations.transformers import use_shammie_kernels

            return use_shammie_kernels()
        return contextlib.nullcontext()

    def _active(self, k: int) -> list[tuple[int, float | None]]:
        """(model, host α or None) for the models that run at position k; a programmed 0 skips the model."""
        if not self.programmed:
            return [(m, None) for m in range(len(self.components))]
        return [(m, a) for m, a in enumerate(self._host_alpha[k]) if a != 0.0]

    def _map_logits(self, m: int, logits: torch.Tensor) -> torch.Tensor:
        vmap = getattr(self, f"vocab_map_{m}")
        return logits if vmap is None else logits.index_select(-1, vmap)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int32):
            raise ValueError(f"Manticore: input_ids must be a 2-D (batch, length) integer tensor, got shape "
                             f"{tuple(input_ids.shape)} dtype {input_ids.dtype}")
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"Manticore: labels must have input_ids' shape {tuple(input_ids.shape)}, "
                             f"got {tuple(labels.shape)}")
        if labels is not None and labels.dtype not in (torch.long, torch.int32):
            raise ValueError(f"Manticore: labels must be an integer tensor (int64 or int32), got {labels.dtype}")
        if input_ids.numel() == 0:
            raise ValueError(f"Manticore: input_ids must be non-empty (batch >= 1, length >= 1), got shape {tuple(input_ids.shape)}")
        too_long = [(i, c) for i, c in enumerate(self.components) if c.max_length and input_ids.shape[1] > c.max_length]
        if too_long:
            i, c = too_long[0]
            raise ValueError(f"Manticore: input_ids has {input_ids.shape[1]} tokens per row, more than model {i} "
                             f"({c.kind}) can embed ({c.max_length} positions)")
        device = self.alpha.device
        for name, t in (("input_ids", input_ids), ("labels", labels)):
            if t is not None and t.device != device:
                raise ValueError(f"Manticore: {name} must be on the hybrid's device ({device}), got {t.device}")
        # An id out of range would index the embeddings out of bounds: an IndexError on CPU, a device-side
        # assert that kills the process on CUDA. One min/max (a sync on CUDA) turns that into an error.
        low, high = (int(v) for v in torch.aminmax(input_ids))
        if not 0 <= low <= high < self.vocab_size:
            raise ValueError(f"Manticore: input_ids must lie in [0, {self.vocab_size}), got values from "
                             f"{low} to {high}")
        if labels is not None:   # the same for the loss's targets; -100 is ignored
            targets = labels[labels != -100]
            low, high = (int(v) for v in torch.aminmax(targets)) if targets.numel() else (0, 0)
            if not 0 <= low <= high < self.vocab_size:
                raise ValueError(f"Manticore: labels must lie in [0, {self.vocab_size}) or be -100 (ignored), "
                                 f"got values from {low} to {high}")
        alpha = self.mixture_weights()
        with self._kernels():
            logits = self._run(input_ids, alpha)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().long(),
                                   ignore_index=-100)
        return logits, loss

    def _model_ids(self, m: int, input_ids: torch.Tensor) -> torch.Tensor:
        vmap = getattr(self, f"vocab_map_{m}")
        return input_ids if vmap is None else vmap[input_ids]

    def _run(self, input_ids, alpha):
        comps, d = self.components, self.width
        first = self._active(0)
        ctx = {m: comps[m].context(input_ids) for m, _ in first}
        for k in range(1, self.config.n_mixtures):
            for m, _ in self._active(k):
                if m not in ctx:
                    ctx[m] = comps[m].context(input_ids)
        h = None
        for m, _ in first:      # embeddings mixed with α_1
            e = _fit(comps[m].embed(self._model_ids(m, input_ids), ctx[m]), d)
            term = alpha[0, m].to(e.dtype) * e
            h = term if h is None else h + term
        for k in range(self.config.n_mixtures):
            out = None
            for m, host in self._active(k):
                a = alpha[k, m].to(h.dtype)
                if host == 1.0:     # programmed one-hot: the model's own blocks on its own width, no projectors
                    x = _fit(h, comps[m].width)
                else:
                    x = (1 - a) * self.proj_in[k][m](h) + a * _fit(h, comps[m].width)
                x = comps[m].prepare(x)
                for i in self.splits[m][k]:
                    x = comps[m].block(i, x, ctx[m])
                if host == 1.0:
                    term = _fit(x, d)
                else:
                    term = a * ((1 - a) * self.proj_out[k][m](x) + a * _fit(x, d))
                out = term if out is None else out + term
            h = out
        logits = None
        for m, host in first:   # LM heads mixed with α_1
            y = self._map_logits(m, comps[m].head(comps[m].prepare(_fit(h, comps[m].width))))
            term = y if host == 1.0 else alpha[0, m].to(y.dtype) * y
            logits = term if logits is None else logits + term
        return logits

    # -- parameter groups ------------------------------------------------------------------------------------
    def model_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.models.parameters())

    def projector_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.proj_in.parameters()) + list(self.proj_out.parameters())

    def alpha_parameters(self) -> list[torch.nn.Parameter]:
        return [self.alpha]

    # -- persistence -----------------------------------------------------------------------------------------
    def save(self, directory: str) -> None:
        """Write manticore_config.json (the hybrid's and each model's HF config) and model.safetensors."""
        from safetensors.torch import save_model

        os.makedirs(directory, exist_ok=True)
        meta = {"manticore": dataclasses.asdict(self.config),
                "models": [m.config.to_dict() for m in self.models],
                "alpha_shape": list(self.alpha.shape),
                # HF configs do not record an attention implementation set after loading
                "attn_implementations": [getattr(m.config, "_attn_implementation", None) for m in self.models]}
        path = os.path.join(directory, "manticore_config.json")
        with open(path + ".tmp", "w") as f:   # a failed write never leaves a truncated config behind
            json.dump(meta, f, indent=2)
        save_model(self, os.path.join(directory, "model.safetensors"))
        os.replace(path + ".tmp", path)

    @classmethod
    def load(cls, directory: str, device=None, dtype=None) -> "Manticore":
        """Rebuild the models from their saved HF configs (no download) and load every weight."""
        import transformers
        from safetensors.torch import load_model

        with open(os.path.join(directory, "manticore_config.json")) as f:
            meta = json.load(f)
        models = []
        attn = meta.get("attn_implementations") or [None] * len(meta["models"])
        for cfg, impl in zip(meta["models"], attn):
            cfg = dict(cfg)
            hf_config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
            kwargs = {"attn_implementation": impl} if impl else {}
            models.append(transformers.AutoModelForCausalLM.from_config(hf_config, **kwargs))
        hybrid = cls(models, ManticoreConfig(**meta["manticore"]))
        weights = os.path.join(directory, "model.safetensors")
        _take_saved_dtypes(hybrid, weights)
        load_model(hybrid, weights, strict=True)
        hybrid.to(device=device)
        if dtype is not None:
            for part in (hybrid.models, hybrid.proj_in, hybrid.proj_out):
                part.to(dtype=dtype)
        return hybrid


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _take_saved_dtypes(hybrid: torch.nn.Module, path: str) -> None:
    """Give every floating parameter the dtype it was saved in (a bf16 hybrid loads as bf16, a module kept in
    float32 stays float32): load_model would otherwise cast the saved values to the fresh model's float32."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        saved = {name: f.get_slice(name).get_dtype() for name in f.keys()}
    for name, param in hybrid.named_parameters(remove_duplicate=False):
        dtype = _SAFETENSORS_DTYPES.get(saved.get(name))
        if dtype is not None and param.dtype != dtype:
            param.data = param.data.to(dtype)
