"""Manticore: hybrids of pretrained Hugging Face causal LMs (GPT-2, GPT-NeoX, Mamba, Mamba2) joined by projectors and
mixture weights α, searched differentiably and fine-tuned; Mamba blocks run on shammie's ops.

    hybrid = Manticore.from_models([gpt2, mamba], n_mixtures=4, projector="linear_skip", alpha_mode="softmax")
    pretrain_projectors(hybrid, loader); search(hybrid, train_loader, val_loader); finetune(hybrid, loader)
    hybrid.program([[1, 0], [0, 1], ...]); print(hybrid.alphas()); hybrid.save(path); Manticore.load(path)
"""

from shammie.manticore.components import COMPONENTS, component_for
from shammie.manticore.model import ALPHA_MODES, PROJECTORS, Manticore, ManticoreConfig, Projector
from shammie.manticore.train import ExponentiatedGradient, finetune, pretrain_projectors, search, set_trainable

__all__ = ["ALPHA_MODES", "COMPONENTS", "ExponentiatedGradient", "Manticore", "ManticoreConfig", "PROJECTORS",
           "Projector", "component_for", "finetune", "pretrain_projectors", "search", "set_trainable"]
