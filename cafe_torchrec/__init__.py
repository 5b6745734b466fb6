"""CAFE embedding compression for TorchRec."""

from cafe_torchrec.config import CafeConfig
from cafe_torchrec.modules import CafeEmbeddingBagCollection
from cafe_torchrec.sketch import HotSketch

__all__ = ["CafeConfig", "CafeEmbeddingBagCollection", "HotSketch"]
