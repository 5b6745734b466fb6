"""The official CAFE artifact (SIGMOD'24), built from its own source at run time, for side-by-side runs.

The artifact (``../shared/peers/cafe-official``, MIT, see its SOURCE.md) is never copied into
this project: ``build_official`` copies it to a cache directory under the system temp dir keyed
by the hash of its files and of the build command, applies its ``insert-grad-torch2.patch``
there (its ``insert_grad`` crashes under torch 2 as released), compiles its sketch with
``BUILD_COMMAND`` into ``embeddings/sklib.so`` (where ``init_embed.py`` looks for it, so it
does not rebuild with its own ``-mavx512*`` flags, which not every CPU has) and imports its
modules from there under a private package name. When the folder is absent (or g++ or patch
is missing) it raises ``OfficialUnavailable`` with the reason, for callers to skip.

``OfficialSketch`` calls its HotSketch through ctypes, exactly as its ``SKEmbeddingBag`` does.
``train_official`` trains its CAFE embedding layer (``EmbeddingLayer``, built with its own
per-ratio defaults from ``tasks/criteo.json``) inside its own ``DLRM_Net`` from ``models.py``
with this project's DLRM shape, on batches ``(dense [B, 13] float32, sparse [B, F] int64 ids in
[0, cardinality_f), labels [B] float32)``.

The artifact keeps its sketches in global C state (``ss[26]`` in sketch.cpp, one library per
process): one ``train_official`` at a time per process, and an ``OfficialSketch`` must use a
sketch index other than 0 (the layer's) when both live in one process.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import importlib
import importlib.machinery
import importlib.util
import json
import math
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

Batch = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # dense [B, 13] f32, sparse [B, F] i64, labels [B] f32

PEER_DIR = Path(__file__).resolve().parents[2] / "shared" / "peers" / "cafe-official"
PEER_ENV = "CAFE_OFFICIAL_DIR"  # overrides PEER_DIR
BUILD_COMMAND = [
    "g++",
    "-O3",
    "-march=native",
    "-fPIC",
    "-shared",
    "-fopenmp",
    "--std=c++17",
    "sketch.cpp",
    "-o",
    "sklib.so",
]
PATCH = "insert-grad-torch2.patch"
NUM_DENSE = 13
# sketch.cpp returns its results in static buffers of 16384 ints (`ins`, `que`): one C call, and so
# one batch of the artifact's layer, carries at most this many ids.
MAX_IDS_PER_CALL = 16384
SLOT_BYTES = 12  # sketch.cpp's slot: uint32 id, float score, int hot row
SLOTS_PER_BUCKET = 4  # one bucket per hot row (init_embed.py: 48 B per hot row)
DECAY = 0.99  # main.py's --cafe_decay default; tasks/criteo.json does not set it
MAX_SKETCHES = 26  # sketch.cpp's ss[26]
OFFICIAL_METHODS = ("cafe", "hash", "full")  # its embedding layers train_official can run


class OfficialUnavailable(RuntimeError):
    """The official artifact cannot be built or loaded here; the message says why."""


@dataclass(frozen=True)
class OfficialArtifact:
    """A built copy of the artifact and its imported modules."""

    root: Path  # the patched copy; embeddings/sklib.so is built
    lib_path: Path
    build_command: str
    init_embed: ModuleType  # embeddings/init_embed.py (EmbeddingLayer)
    sk_embedding_bag: ModuleType  # embeddings/sk_embedding_bag.py (SKEmbeddingBag)
    models: ModuleType  # models.py (DLRM_Net)
    cafe_grid: Dict[str, list]  # tasks/criteo.json's "cafe" entry

    @property
    def lib(self) -> ctypes.CDLL:
        """The sketch library (dlopen returns the one handle init_embed.py also loads)."""
        return ctypes.CDLL(str(self.lib_path))


@dataclass(frozen=True)
class OfficialConfig:
    """The artifact's CAFE settings at one compression ratio (its tasks/criteo.json grid)."""

    compress_rate: float
    threshold: int
    hash_rate: float
    decay: float = DECAY

    @property
    def hot_share(self) -> float:
        """Share of the memory for hot rows and sketch: 1 - hash_rate."""
        return 1.0 - self.hash_rate


def peer_dir() -> Path:
    """Where the artifact's source is read from ($CAFE_OFFICIAL_DIR, else ../shared/peers/cafe-official)."""
    return Path(os.environ.get(PEER_ENV, str(PEER_DIR)))


def _source_digest(src: Path) -> str:
    """Hash of every file's relative path and bytes, the build command and the host (-march=native)."""
    h = hashlib.sha256()
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(src)).encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(" ".join(BUILD_COMMAND).encode() + os.uname().nodename.encode() + os.uname().machine.encode())
    return h.hexdigest()[:16]


def _make_writable(root: Path) -> None:
    """The shared source is read-only; its copy must take the patch and the library."""
    for path in [root, *root.rglob("*")]:
        path.chmod(path.stat().st_mode | stat.S_IWUSR | (stat.S_IXUSR if path.is_dir() else 0))


def _run(cmd: List[str], cwd: Path, what: str, stdin: Optional[Path] = None) -> None:
    try:
        with open(stdin, "rb") if stdin else open(os.devnull, "rb") as inp:
            proc = subprocess.run(cmd, cwd=cwd, stdin=inp, capture_output=True, text=True, timeout=600)
    except FileNotFoundError as e:
        raise OfficialUnavailable(f"{what}: {cmd[0]} not found ({e})") from e
    if proc.returncode != 0:
        raise OfficialUnavailable(f"{what} failed ({' '.join(cmd)} in {cwd}): {proc.stderr.strip()[-2000:]}")


def _build_into(src: Path, dest: Path) -> None:
    """Copy, patch and compile the artifact into `dest` (a fresh directory)."""
    shutil.copytree(src, dest, dirs_exist_ok=True)
    _make_writable(dest)
    _run(["patch", "-p0", "--forward", "--batch"], dest, f"applying {PATCH}", stdin=dest / PATCH)
    _run(BUILD_COMMAND, dest / "embeddings", "compiling sketch.cpp")


def _import(root: Path, digest: str) -> Tuple[ModuleType, ModuleType, ModuleType]:
    """Import embeddings.init_embed, embeddings.sk_embedding_bag and models from `root` under a
    private package name (its `embeddings` and `models` must not shadow anything else)."""
    name = f"_cafe_official_{digest}"
    if name not in sys.modules:
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(root)]
        sys.modules[name] = importlib.util.module_from_spec(spec)
    return (
        importlib.import_module(f"{name}.embeddings.init_embed"),
        importlib.import_module(f"{name}.embeddings.sk_embedding_bag"),
        importlib.import_module(f"{name}.models"),
    )


def build_official(cache_root: Optional[str] = None) -> OfficialArtifact:
    """Build (or reuse) the patched artifact copy of `peer_dir()` and import it; raises OfficialUnavailable.

    The copy lives in `cache_root` (default: the system temp dir) under a name keyed by the
    source hash; it is built in a staging directory and renamed into place, so concurrent
    builders never see half a build. Building takes ~1 s, importing ~0.1 s; later calls in
    the process return the same artifact.
    """
    return _build_cached(str(peer_dir()), cache_root)


@lru_cache(maxsize=None)
def _build_cached(source: str, cache_root: Optional[str]) -> OfficialArtifact:
    src = Path(source)
    if not (src / "embeddings" / "sketch.cpp").is_file():
        raise OfficialUnavailable(f"the official CAFE artifact is not at {src} (set ${PEER_ENV} to its folder)")
    if not (src / PATCH).is_file():
        raise OfficialUnavailable(f"{src / PATCH} is missing: the artifact's insert_grad needs it under torch 2")
    digest = _source_digest(src)
    base = Path(cache_root or tempfile.gettempdir())
    root = base / f"cafe-official-{digest}"
    lib_path = root / "embeddings" / "sklib.so"
    if not lib_path.is_file():
        base.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".cafe-official-{digest}-", dir=base))
        try:
            _build_into(src, staging)
            try:
                staging.rename(root)
            except OSError:  # another process finished first: use its build
                if not lib_path.is_file():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    init_embed, sk_bag, models = _import(root, digest)
    grid = json.loads((root / "tasks" / "criteo.json").read_text())["cafe"]
    return OfficialArtifact(root, lib_path, " ".join(BUILD_COMMAND), init_embed, sk_bag, models, grid)


def official_config(artifact: OfficialArtifact, compression_ratio: float) -> OfficialConfig:
    """Threshold and hash rate the artifact uses at this ratio (tasks/criteo.json); ValueError off its grid."""
    rate = 1.0 / compression_ratio
    rates = artifact.cafe_grid["compress_rate"]
    for i, r in enumerate(rates):
        if math.isclose(r, rate, rel_tol=1e-9):
            return OfficialConfig(
                r, int(artifact.cafe_grid["cafe_sketch_threshold"][i]), float(artifact.cafe_grid["cafe_hash_rate"][i])
            )
    raise ValueError(
        f"compression_ratio {compression_ratio:g}: the official artifact's grid (tasks/criteo.json) "
        f"has ratios {sorted(round(1 / r) for r in rates)}"
    )


# ----------------------------------------------------------------------------- the sketch, by ctypes
class OfficialSketch:
    """The artifact's HotSketch (class SS in sketch.cpp) through its C entry points.

    `hot_rows` hot rows and as many 4-slot buckets (its init); ids are uint32 and hashed by
    modulo (its Hash), so give it label-encoded global ids < 2^31. `index` picks one of its
    26 global sketches: 0 is the one its EmbeddingLayer uses.
    """

    def __init__(
        self,
        artifact: OfficialArtifact,
        hot_rows: int,
        threshold: int,
        decay: float = DECAY,
        index: int = MAX_SKETCHES - 1,
    ) -> None:
        if not 0 <= index < MAX_SKETCHES:
            raise ValueError(f"index must be in [0, {MAX_SKETCHES}), got {index}")
        if hot_rows < 2:
            raise ValueError(f"hot_rows must be >= 2 (its row 0 is never handed out), got {hot_rows}")
        lib = artifact.lib
        self.index = index
        self.hot_rows = hot_rows
        self._init = lib.init
        self._init.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_double, ctypes.c_int]
        self._init.restype = None
        self.c_query = lib.batch_query
        self.c_query.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int, ctypes.c_int]
        self.c_query.restype = ctypes.POINTER(ctypes.c_int)
        self.c_insert = lib.batch_insert_val
        self.c_insert.argtypes = [
            ctypes.POINTER(ctypes.c_int),
            ctypes.POINTER(ctypes.c_float),
            ctypes.c_int,
            ctypes.c_int,
        ]
        self.c_insert.restype = ctypes.POINTER(ctypes.c_int)
        self._init(
            hot_rows, int(threshold), ctypes.c_double(decay), index
        )  # leaks the previous SS at index, as init_embed does

    @property
    def nbytes(self) -> int:
        """Its slots: hot_rows buckets x 4 slots x 12 B (its free-row queue, 4 B a row, not counted by the paper)."""
        return self.hot_rows * SLOTS_PER_BUCKET * SLOT_BYTES

    @staticmethod
    def ids_arg(ids: np.ndarray) -> ctypes.POINTER(ctypes.c_int):
        """A C pointer to int32 ids (keeps `ids` alive through the returned object)."""
        if ids.dtype != np.int32 or not ids.flags.c_contiguous:
            raise ValueError("ids must be a contiguous int32 array")
        return ids.ctypes.data_as(ctypes.POINTER(ctypes.c_int))

    @staticmethod
    def scores_arg(scores: np.ndarray) -> ctypes.POINTER(ctypes.c_float):
        if scores.dtype != np.float32 or not scores.flags.c_contiguous:
            raise ValueError("scores must be a contiguous float32 array")
        return scores.ctypes.data_as(ctypes.POINTER(ctypes.c_float))

    def query(self, ids: np.ndarray) -> np.ndarray:
        """Its batch_query: per id -row if it holds a hot row, else the id (a copy of its static buffer)."""
        return self._chunked(ids, lambda p, n, start: self.c_query(p, n, self.index))

    def insert(self, ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Its batch_insert_val, in calls of at most MAX_IDS_PER_CALL ids: 1 where an id just became hot."""
        sp = scores.astype(np.float32, copy=False)
        return self._chunked(
            ids, lambda p, n, start: self.c_insert(p, self.scores_arg(sp[start : start + n]), n, self.index)
        )

    def _chunked(self, ids: np.ndarray, call) -> np.ndarray:
        ids = np.ascontiguousarray(ids, dtype=np.int32)
        out = np.empty(len(ids), dtype=np.int32)
        for start in range(0, len(ids), MAX_IDS_PER_CALL):
            chunk = ids[start : start + MAX_IDS_PER_CALL]
            ptr = call(self.ids_arg(chunk), len(chunk), start)
            out[start : start + len(chunk)] = np.ctypeslib.as_array(ptr, shape=(len(chunk),))
        return out


# ----------------------------------------------------------------------------- its CAFE layer in its DLRM
def official_memory(layer: torch.nn.Module, cardinalities: Sequence[int], embedding_dim: int) -> Dict[str, float]:
    """Bytes of the artifact's embedding layer as its init_embed.py sizes it: the shared hot table,
    its sketch (48 B per hot row), each compressed field's hash table, the plain tables."""
    row = 4 * embedding_dim
    hot_rows = int(getattr(layer, "hotn", 0))
    hashed = plain = 0
    for emb in layer.embeddings:
        if hasattr(emb, "hash_size"):  # SKEmbeddingBag
            hashed += emb.hash_size
        else:  # nn.EmbeddingBag or its HashEmbeddingBag
            plain += emb.num_embeddings
    sketch = hot_rows * SLOTS_PER_BUCKET * SLOT_BYTES
    physical = (hot_rows + hashed + plain) * row + sketch
    logical = sum(int(c) for c in cardinalities) * row
    return {
        "hot_rows": hot_rows,
        "hashed_rows": hashed,
        "plain_rows": plain,
        "sketch_bytes": sketch,
        "memory_bytes": physical,
        "logical_bytes": logical,
        "compression_ratio": float(logical / physical),
    }


def build_official_model(
    artifact: OfficialArtifact,
    cardinalities: Sequence[int],
    config: Optional[OfficialConfig],
    embedding_dim: int,
    dense_arch: Sequence[int],
    over_arch: Sequence[int],
    method: str = "cafe",
) -> torch.nn.Module:
    """Its EmbeddingLayer inside its DLRM_Net with this project's DLRM shape: `method` "cafe" (one
    shared sketch, `config`'s threshold and hash rate), "hash" (its HashEmbeddingBag: ids modulo
    ceil(n / ratio) rows per field, `config`'s rate) or "full" (one plain table per field, no
    `config`). Fields of at most 2000 / ratio ids stay plain tables in "cafe" and "hash".

    Its DLRM_Net is torchrec's DLRM in shape (ReLU after every dense layer, the last included;
    pairwise dots of the dense output and the F embeddings, upper triangle, concatenated after
    the dense output; ReLU between over layers); it differs in the init (normal, std
    sqrt(2 / (fan_in + fan_out)), as the DLRM reference) and ends in a sigmoid with BCELoss
    where torchrec's DLRMTrain uses BCEWithLogits.
    """
    if method != "full" and config is None:
        raise ValueError(f"method {method!r} needs the artifact's config at a ratio")
    if method == "full" or config is None:
        args = argparse.Namespace(compress_method=None, compress_rate=1.0)
    elif method == "hash":
        args = argparse.Namespace(compress_method="hash", compress_rate=config.compress_rate)
    else:
        args = argparse.Namespace(
            compress_method="cafe",
            compress_rate=config.compress_rate,
            cafe_hash_rate=config.hash_rate,
            cafe_sketch_threshold=config.threshold,
            cafe_decay=config.decay,
            cafe_hot_separate_field=False,
            cafe_use_freq=False,
        )
    layer = artifact.init_embed.EmbeddingLayer(
        args, embedding_dim, np.asarray(cardinalities, dtype=np.int64), torch.device("cpu")
    )
    num_features = len(cardinalities)
    ln_bot = np.array([NUM_DENSE, *dense_arch], dtype=int)
    ln_top = np.array([num_features * (num_features + 1) // 2 + dense_arch[-1], *over_arch], dtype=int)
    return artifact.models.DLRM_Net(layer, torch.device("cpu"), embedding_dim, num_features, NUM_DENSE, ln_bot, ln_top)


def _check_batch(
    batch: Batch, cardinalities: torch.Tensor, where: str
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate one batch before the model sees it: shapes, dtypes, ids in range, size per C call."""
    dense, sparse, labels = batch
    b = sparse.shape[0] if sparse.dim() == 2 else -1
    if sparse.dim() != 2 or sparse.shape[1] != len(cardinalities) or sparse.dtype != torch.int64:
        raise ValueError(
            f"{where}: sparse must be int64 [B, {len(cardinalities)}], got {sparse.dtype} {tuple(sparse.shape)}"
        )
    if dense.shape != (b, NUM_DENSE) or labels.shape != (b,):
        raise ValueError(
            f"{where}: dense must be [B, {NUM_DENSE}] and labels [B] with B = {b}, "
            f"got {tuple(dense.shape)} and {tuple(labels.shape)}"
        )
    if b > MAX_IDS_PER_CALL:
        raise ValueError(
            f"{where}: batch of {b} rows; the artifact's sketch returns at most {MAX_IDS_PER_CALL} "
            "ids per call (static buffers in sketch.cpp)"
        )
    bad = ((sparse < 0) | (sparse >= cardinalities)).any(dim=0)
    if bool(bad.any()):
        f = int(bad.nonzero()[0])
        raise ValueError(
            f"{where}: feature {f} has ids outside [0, {int(cardinalities[f])}) (the artifact needs label-encoded ids)"
        )
    return dense.float(), sparse.t().contiguous(), labels.float().view(-1, 1)


def _evaluate(
    model: torch.nn.Module, batches: Iterable[Batch], cardinalities: torch.Tensor, where: str
) -> Tuple[float, float]:
    """AUC (torchmetrics) and mean log loss; (nan, nan) for an empty split. No sketch updates."""
    from torchmetrics.classification import BinaryAUROC

    auroc = BinaryAUROC()
    loss_sum, n = 0.0, 0
    model.eval()
    with torch.no_grad():
        for batch in batches:
            dense, indices, labels = _check_batch(batch, cardinalities, where)
            offsets = torch.arange(indices.shape[1]).expand(indices.shape[0], -1)
            preds = model(dense, offsets, indices)
            auroc.update(preds.view(-1), labels.view(-1).long())
            loss_sum += float(torch.nn.functional.binary_cross_entropy(preds, labels, reduction="sum"))
            n += labels.numel()
    model.train()
    if n == 0:
        return float("nan"), float("nan")
    return float(auroc.compute()), loss_sum / n


def train_official(
    cardinalities: Sequence[int],
    train: Iterable[Batch],
    validation: Iterable[Batch],
    test: Iterable[Batch],
    compression_ratio: float,
    seed: int,
    embedding_dim: int = 16,
    learning_rate: float = 0.05,
    dense_lr: float = 0.01,
    dense_arch: Optional[Sequence[int]] = None,
    over_arch: Sequence[int] = (64, 32, 1),
    progress: bool = False,
    method: str = "cafe",
) -> Dict[str, float]:
    """Train the artifact's CAFE layer in its DLRM_Net, one pass over `train`; evaluate on both splits.

    The layer takes the artifact's own settings at `compression_ratio` (tasks/criteo.json:
    threshold, hash rate; decay 0.99; one sketch shared by all fields; fields of at most
    2000 / ratio ids stay plain tables). The step is its main.py's: forward, BCELoss, backward,
    `embedding_layer.insert_grad(indices)` (importance into the sketch, promoted ids' rows copied),
    then the optimizer step; here element-wise Adagrad at `learning_rate` on the embeddings and
    Adagrad at `dense_lr` on the MLPs (this project's trainer with --optimizer adagrad; its
    main.py uses one optimizer for all parameters). Torch's intra-op threads are the caller's
    (its sketch query is an OpenMP loop on the same libgomp, so they apply to it too).

    Returns val_auc, test_auc, test_log_loss, online_train_loss (prequential: each training
    batch's loss before its update, averaged over samples), samples_per_sec (the training loop,
    data iteration included), memory_bytes (official_memory), and compression_ratio, hot_rows,
    threshold, hot_share, hot_lookup_share (share of compressed-field training lookups served by
    a hot row), train_samples. Raises OfficialUnavailable, or ValueError for a ratio off its grid,
    a bad shape, ids out of range or a batch over 16384 rows.

    `method="full"` trains its uncompressed baseline instead (main.py without --compress_method:
    one plain table per field; `compression_ratio` is then not used), and `method="hash"` its
    hashing baseline at `compression_ratio` (main.py --compress_method hash): both tell
    differences of the training setup from differences of CAFE.
    """
    from tqdm import tqdm

    dense_arch = tuple(dense_arch) if dense_arch is not None else (64, embedding_dim)
    if not dense_arch or dense_arch[-1] != embedding_dim:
        raise ValueError(f"dense_arch must end with embedding_dim {embedding_dim}, got {dense_arch}")
    if not over_arch or over_arch[-1] != 1:
        raise ValueError(f"over_arch must end with 1, got {tuple(over_arch)}")
    if len(cardinalities) < 2 or min(cardinalities) < 1:
        raise ValueError(f"need at least 2 features of >= 1 id each, got {list(cardinalities)}")
    if sum(cardinalities) >= 2**31:
        raise ValueError("the artifact's global ids (id + field offset) are int32: cardinalities must sum below 2^31")
    if method not in OFFICIAL_METHODS:
        raise ValueError(f"method must be one of {OFFICIAL_METHODS}, got {method!r}")
    artifact = build_official()
    config = official_config(artifact, compression_ratio) if method != "full" else None
    torch.manual_seed(seed)
    np.random.seed(seed)
    model = build_official_model(artifact, cardinalities, config, embedding_dim, dense_arch, over_arch, method)
    layer = model.embedding_layer
    cards = torch.tensor(list(cardinalities), dtype=torch.int64)
    sketched = [emb for emb in layer.embeddings if hasattr(emb, "hash_size")]
    dense_params = [p for name, p in model.named_parameters() if not name.startswith("embedding_layer.")]
    emb_opt = torch.optim.Adagrad(list(layer.parameters()), lr=learning_rate)
    dense_opt = torch.optim.Adagrad(dense_params, lr=dense_lr)

    loss_sum, samples, hot, lookups = 0.0, 0, 0, 0
    # Adagrad on its sparse gradients makes torch warn once that sparse invariant checks are off
    warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
    start = time.perf_counter()
    for batch in tqdm(train, disable=not progress, desc="official", mininterval=1.0):
        dense, indices, labels = _check_batch(batch, cards, "train")
        offsets = torch.arange(indices.shape[1]).expand(indices.shape[0], -1)
        preds = model(dense, offsets, indices)
        loss = model.loss_fn(preds, labels)
        emb_opt.zero_grad()
        dense_opt.zero_grad()
        loss.backward()
        layer.insert_grad(indices)
        emb_opt.step()
        dense_opt.step()
        loss_sum += float(loss.detach()) * labels.numel()
        samples += labels.numel()
        hot += sum(int(emb.query_dic.sum()) for emb in sketched)
        lookups += sum(emb.query_dic.size for emb in sketched)
    train_time = time.perf_counter() - start

    val_auc, _ = _evaluate(model, validation, cards, "validation")
    test_auc, test_log_loss = _evaluate(model, test, cards, "test")
    memory = official_memory(layer, cardinalities, embedding_dim)
    return {
        "val_auc": val_auc,
        "test_auc": test_auc,
        "test_log_loss": test_log_loss,
        "online_train_loss": loss_sum / samples if samples else float("nan"),
        "samples_per_sec": samples / train_time if samples else float("nan"),
        "memory_bytes": float(memory["memory_bytes"]),
        "compression_ratio": float(memory["compression_ratio"]),
        "hot_rows": float(memory["hot_rows"]),
        "threshold": float(config.threshold) if method == "cafe" and config else float("nan"),
        "hot_share": config.hot_share if method == "cafe" and config else float("nan"),
        "hot_lookup_share": hot / lookups if lookups else float("nan"),
        "train_samples": float(samples),
    }
