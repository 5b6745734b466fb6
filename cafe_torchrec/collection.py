"""What every collection here shares with TorchRec's EmbeddingBagCollection interface."""

from __future__ import annotations

from typing import List, Optional

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface

from cafe_torchrec.validation import check_tables


class ConfiguredCollection(EmbeddingBagCollectionInterface):
    """Holds the logical tables, weightedness and device that DLRM and the sharders read."""

    def __init__(self, tables: List[EmbeddingBagConfig], is_weighted: bool, device: Optional[torch.device]) -> None:
        super().__init__()
        check_tables(tables, is_weighted, type(self).__name__)
        self._tables = list(tables)
        self._is_weighted = is_weighted
        self._device = torch.device(device) if device is not None else torch.device("cpu")

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return self._tables

    def is_weighted(self) -> bool:
        return self._is_weighted

    @property
    def device(self) -> torch.device:
        return self._device
