"""Serving a trained CAFE collection: freeze it into a compact, traceable inference module, put
it through TorchRec's serving recipe, and convert to and from stock EmbeddingBagCollections.

- ``freeze(collection, dtype)``: the frozen
  module (FrozenCafeEmbeddingBagCollection): no sketch, no optimizer state, its physical
  tables in TorchRec's quantized collection (FP32, FP16, INT8 or INT4).
- ``quantize_inference_model(model, dtype)``: TorchRec's function of that name for a model
  with CAFE collections (unsharded, or sharded under DMP and gathered to rank 0).
- ``to_embedding_bag_collection`` / ``warm_start`` (with ``frequent_ids``): to a stock
  EmbeddingBagCollection and back.
"""

from cafe_torchrec.inference.convert import frequent_ids, to_embedding_bag_collection, warm_start
from cafe_torchrec.inference.freeze import SERVING_DTYPES, freeze, served_dtype
from cafe_torchrec.inference.frozen import FrozenCafeEmbeddingBagCollection
from cafe_torchrec.inference.recipe import quantize_inference_model

__all__ = [
    "FrozenCafeEmbeddingBagCollection",
    "SERVING_DTYPES",
    "freeze",
    "frequent_ids",
    "quantize_inference_model",
    "served_dtype",
    "to_embedding_bag_collection",
    "warm_start",
]
