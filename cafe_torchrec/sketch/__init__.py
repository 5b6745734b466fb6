"""HotSketch: the importance sketch of CAFE, with a C++ CPU kernel and a torch-ops kernel."""

from cafe_torchrec.sketch.hot_sketch import HotSketch
from cafe_torchrec.sketch.types import InsertResult

__all__ = ["HotSketch", "InsertResult"]
