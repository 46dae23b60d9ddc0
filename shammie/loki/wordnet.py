"""WordNet 3.0's noun hypernym tree and the ImageNet synset lists, from local files only.

Tree: every noun synset of Debian's `wordnet-base` (/usr/share/wordnet/data.noun, about 82k) under
its first hypernym pointer ('@', else the instance hypernym '@i'); the root is `entity`. An ImageNet
wnid is 'n' + the 8-digit synset offset. The ImageNet-1k and -21k lists come from timm's package
data (`pip install --no-deps timm`; read as files, timm is not imported).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

import numpy as np

WORDNET_DIRS = ("/usr/share/wordnet", "/usr/local/share/wordnet", "/usr/share/wordnet/dict")
IMAGENET_LISTS = {"1k": "imagenet_synsets.txt", "21k": "imagenet21k_goog_synsets.txt"}


def wordnet_dir() -> Path | None:
    """The folder holding WordNet's data.noun ($WNSEARCHDIR first), or None."""
    for d in (os.environ.get("WNSEARCHDIR"), *WORDNET_DIRS):
        if d and (Path(d) / "data.noun").is_file():
            return Path(d)
    return None


def timm_info_dir() -> Path | None:
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0]) / "data" / "_info"
    return d if d.is_dir() else None


def available() -> bool:
    """Are both WordNet and timm's synset lists installed?"""
    info = timm_info_dir()
    return wordnet_dir() is not None and info is not None and all((info / f).is_file() for f in IMAGENET_LISTS.values())


@dataclasses.dataclass
class NounTree:
    offsets: np.ndarray   # (n,) synset offsets
    names: list[str]      # first lemma of each synset
    parent: np.ndarray    # (n,) node id of the first hypernym, −1 at entity

    def nodes_of(self, wnids) -> np.ndarray:
        """Node ids of ImageNet wnids ('n01440764')."""
        index = {int(o): i for i, o in enumerate(self.offsets.tolist())}
        try:
            return np.array([index[int(w[1:])] for w in wnids], dtype=np.int64)
        except KeyError as err:
            raise ValueError(f"wnid n{int(err.args[0]):08d} is not a WordNet 3.0 noun synset") from None


def load_noun_tree(directory: str | Path | None = None) -> NounTree:
    directory = Path(directory) if directory is not None else wordnet_dir()
    if directory is None or not (directory / "data.noun").is_file():
        raise FileNotFoundError("WordNet's data.noun not found: install it with `apt-get install -y wordnet-base` "
                                "or set WNSEARCHDIR")
    offsets, names, hyper = [], [], []
    with open(directory / "data.noun", encoding="latin-1") as f:
        for line in f:
            if line.startswith("  "):  # the licence header
                continue
            fields = line.split(" | ", 1)[0].split()
            words = int(fields[3], 16)
            pointers_at = 4 + 2 * words
            first = instance = -1
            for i in range(int(fields[pointers_at])):
                symbol, target = fields[pointers_at + 1 + 4 * i], fields[pointers_at + 2 + 4 * i]
                if symbol == "@" and first < 0:
                    first = int(target)
                elif symbol == "@i" and instance < 0:
                    instance = int(target)
            offsets.append(int(fields[0]))
            names.append(fields[4])
            hyper.append(first if first >= 0 else instance)
    offsets_arr = np.array(offsets, dtype=np.int64)
    order = np.argsort(offsets_arr)
    hyper_arr = np.array(hyper, dtype=np.int64)
    pos = np.searchsorted(offsets_arr[order], hyper_arr)
    parent = np.where(hyper_arr >= 0, order[np.minimum(pos, len(order) - 1)], -1)
    return NounTree(offsets_arr, names, parent)


def imagenet_wnids(which: str = "1k") -> list[str]:
    """The ImageNet-1k or ImageNet-21k class wnids in timm's (the models') class order."""
    info = timm_info_dir()
    if info is None or which not in IMAGENET_LISTS:
        raise FileNotFoundError(f"timm's synset lists not found (pip install --no-deps timm); which must be one of {list(IMAGENET_LISTS)}")
    return (info / IMAGENET_LISTS[which]).read_text().split()
