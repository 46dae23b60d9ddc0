"""MoRe (Monarch Rectangular) adapters for PyTorch and Hugging Face models, on shammie's Monarch op.

peft-shaped API: `apply(model, MoReConfig(...))` (like get_peft_model), `trainable_parameters`,
`merge` / `unmerge` / `merge_and_unload`, `save_adapter` / `load_adapter`.
"""

from shammie.more.config import MoReConfig
from shammie.more.layer import MoReLinear, adapter_geometry
from shammie.more.model import (
    ParameterCount,
    adapter_state_dict,
    apply,
    load_adapter,
    merge,
    merge_and_unload,
    save_adapter,
    trainable_parameters,
    unmerge,
)

__all__ = ["MoReConfig", "MoReLinear", "ParameterCount", "adapter_geometry", "adapter_state_dict", "apply",
           "load_adapter", "merge", "merge_and_unload", "save_adapter", "trainable_parameters", "unmerge"]
