"""How Manticore runs one Hugging Face causal LM in pieces: embed(ids) -> h, block i: h -> h, head(h) -> logits,
each exactly as the model's own forward computes them (same masks, positions, dropout and dtype casts).

Supported: GPT-2 (`GPT2LMHeadModel`), GPT-NeoX (`GPTNeoXForCausalLM`), Mamba (`MambaForCausalLM`) and Mamba2
(`Mamba2ForCausalLM`).
"""

from __future__ import annotations

import torch


class Component:
    """Stateless view of one HF causal LM; the model itself stays a submodule of the hybrid."""

    kind = ""
    max_length: int | None = None   # the longest sequence the model can embed (None: no hard limit)

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.width = int(model.config.hidden_size)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])

    @property
    def blocks(self) -> torch.nn.ModuleList:
        raise NotImplementedError

    def context(self, ids: torch.Tensor) -> dict:
        """Per-forward inputs shared by every block (masks, positions)."""
        return {}

    def _probe(self, ids):
        """An uninitialized (batch, length, width) tensor: masks and rotary tables read only its metadata."""
        weight = self.model.get_input_embeddings().weight
        return weight.new_empty(ids.shape[0], ids.shape[1], self.width)

    def prepare(self, h: torch.Tensor) -> torch.Tensor:
        """h in the dtype this model's blocks and head take (a no-op inside the model's own forward)."""
        return h.to(self.model.get_input_embeddings().weight.dtype)

    def embed(self, ids: torch.Tensor, ctx: dict) -> torch.Tensor:
        raise NotImplementedError

    def block(self, i: int, h: torch.Tensor, ctx: dict) -> torch.Tensor:
        raise NotImplementedError

    def head(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _causal_mask(config, embeds, positions):
    from transformers.masking_utils import create_causal_mask

    # The cache argument is positional: transformers renamed it (past_key_values -> cache) in 5.2x.
    return create_causal_mask(config, embeds, None, None, position_ids=positions)


def _positions(ids):
    return torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)


class GPT2Component(Component):
    kind = "gpt2"

    def __init__(self, model):
        super().__init__(model)
        self.max_length = int(model.config.n_positions)   # learned position embeddings

    @property
    def blocks(self):
        return self.model.transformer.h

    def context(self, ids):
        positions = _positions(ids)
        return {"positions": positions, "mask": _causal_mask(self.model.config, self._probe(ids), positions)}

    def embed(self, ids, ctx):
        t = self.model.transformer
        h = t.wte(ids)
        h = h + t.wpe(ctx["positions"]).to(h.device)
        return t.drop(h)

    def block(self, i, h, ctx):
        return self.blocks[i](h, attention_mask=ctx["mask"], position_ids=ctx["positions"])

    def head(self, h):
        return self.model.lm_head(self.model.transformer.ln_f(h))


class GPTNeoXComponent(Component):
    kind = "gpt_neox"

    @property
    def blocks(self):
        return self.model.gpt_neox.layers

    def context(self, ids):
        g = self.model.gpt_neox
        positions = _positions(ids)
        probe = self._probe(ids)
        return {"positions": positions, "mask": _causal_mask(self.model.config, probe, positions),
                "rotary": g.rotary_emb(probe, position_ids=positions)}

    def embed(self, ids, ctx):
        g = self.model.gpt_neox
        return g.emb_dropout(g.embed_in(ids))

    def block(self, i, h, ctx):
        return self.blocks[i](h, attention_mask=ctx["mask"], position_ids=ctx["positions"],
                              position_embeddings=ctx["rotary"])

    def head(self, h):
        return self.model.lm_head(self.model.gpt_neox.final_layer_norm(h))


class MambaComponent(Component):
    kind = "mamba"

    @property
    def blocks(self):
        return self.model.backbone.layers

    def prepare(self, h):
        return h   # the blocks take a float32 residual stream (residual_in_fp32) or the model's dtype alike

    def embed(self, ids, ctx):
        return self.model.backbone.embeddings(ids)

    def block(self, i, h, ctx):
        return self.blocks[i](h)

    def head(self, h):
        h = self.model.backbone.norm_f(h)
        return self.model.lm_head(h.to(self.model.lm_head.weight.dtype)).float()


class Mamba2Component(MambaComponent):
    """Mamba2's backbone runs like Mamba's: embeddings, blocks on the residual stream, norm_f, head in
    float32 (without a padding mask its recurrent attention mask is None)."""

    kind = "mamba2"


COMPONENTS = {c.kind: c for c in (GPT2Component, GPTNeoXComponent, MambaComponent, Mamba2Component)}


def component_for(model: torch.nn.Module) -> Component:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in COMPONENTS:
        raise TypeError(f"Manticore: unsupported model {type(model).__name__} (config.model_type={model_type!r}); "
                        f"supported HF causal LMs: {sorted(COMPONENTS)}")
    if model.get_output_embeddings() is None:
        raise TypeError(f"Manticore: {type(model).__name__} has no LM head; pass the *ForCausalLM / *LMHeadModel class")
    return COMPONENTS[model_type](model)
