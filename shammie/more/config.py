"""MoReConfig: which layers get a Monarch adapter, and its geometry."""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Sequence


@dataclasses.dataclass
class MoReConfig:
    """Configuration of MoRe (Monarch Rectangular) adapters.

    target_modules: module names (a name matches a module whose dotted path equals it or ends with
        "." + it, as in peft) or one regular expression (a str, matched against the whole path).
    nblocks: number of diagonal blocks (k = l of the Monarch product).
    blk_r: the rank of each block (q = r). Ignored when `square` is set.
    blk_sz: input block size; default ceil(in_features / nblocks).
    square: blocks of full rank (blk_r = input block size).
    dropout: dropout on the adapter's input (never applied when merging).
    modules_to_save: modules trained in full and saved with the adapter (e.g. a classifier head).
    bias: "none" keeps every bias frozen; "all" trains (and saves) every bias.
    """

    target_modules: Sequence[str] | str
    nblocks: int = 4
    blk_r: int = 4
    blk_sz: int | None = None
    square: bool = False
    dropout: float = 0.0
    modules_to_save: Sequence[str] = ()
    bias: str = "none"

    def __post_init__(self):
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as error:
                raise ValueError(f"MoReConfig: target_modules is not a valid regular expression: {error}") from None
        else:
            self.target_modules = list(self.target_modules)
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ValueError(f"MoReConfig: target_modules must be a non-empty list of names or a regex, got {self.target_modules!r}")
        self.modules_to_save = list(self.modules_to_save or ())
        _require(isinstance(self.nblocks, int) and self.nblocks > 0, f"nblocks must be a positive integer, got {self.nblocks!r}")
        if not self.square:
            _require(isinstance(self.blk_r, int) and self.blk_r > 0, f"blk_r must be a positive integer, got {self.blk_r!r}")
        _require(self.blk_sz is None or (isinstance(self.blk_sz, int) and self.blk_sz > 0),
                 f"blk_sz must be None or a positive integer, got {self.blk_sz!r}")
        _require(0.0 <= float(self.dropout) < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}")
        _require(self.bias in ("none", "all"), f"bias must be 'none' or 'all', got {self.bias!r}")

    def matches(self, name: str) -> bool:
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, name) is not None
        return any(name == t or name.endswith("." + t) for t in self.target_modules)

    def to_json(self) -> str:
        return json.dumps({"method": "MoRe", **dataclasses.asdict(self)}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "MoReConfig":
        data = json.loads(text)
        if data.pop("method", "MoRe") != "MoRe":
            raise ValueError("adapter config is not a MoRe config")
        data.pop("shammie_version", None)
        return cls(**data)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"MoReConfig: {message}")
