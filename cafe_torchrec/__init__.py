"""CAFE embedding compression for TorchRec.

The names below are imported on first use (PEP 562), so the torch-only parts (``hashing``,
``sketch``, ``ops``) import without TorchRec, e.g. on a machine that only has torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cafe_torchrec.config import CafeConfig
    from cafe_torchrec.modules import CafeEmbeddingBagCollection
    from cafe_torchrec.sketch import HotSketch

__all__ = ["CafeConfig", "CafeEmbeddingBagCollection", "HotSketch"]
_WHERE = {
    "CafeConfig": "cafe_torchrec.config",
    "CafeEmbeddingBagCollection": "cafe_torchrec.modules",
    "HotSketch": "cafe_torchrec.sketch",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'cafe_torchrec' has no attribute {name!r}")
