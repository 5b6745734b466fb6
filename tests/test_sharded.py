"""Sharded CAFE on 2 real gloo processes: table-wise and row-wise against single-process runs.

TorchRec divides sharded embedding gradients by the world size (DDP-style averaging), so the
single-process runs use loss / world_size on the global batch (rank 0's samples, then rank 1's).
Importance scores are normalised per feature, so the division does not change the sketch.
"""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.distributed as dist
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from cafe_torchrec import CafeConfig, CafeEmbeddingBagCollection
from cafe_torchrec.distributed import CafeEmbeddingBagCollectionSharder
from cafe_torchrec.hashing import KEY_SPACE
from cafe_torchrec.migration import row_store
from cafe_torchrec.remap import CafeGroupRemap
from cafe_torchrec.sketch.types import errors_of, hot_rows_of
from tests.dist_utils import run_ranks
from tests.helpers import tables, zipf_kjt

WORLD, BATCH, STEPS, LR = 2, 16, 12, 0.1
FEATURES = ["f0", "f1", "f2"]
GROUP = "cafe_dim8"


def assert_same_rows_and_errors(slots: torch.Tensor, expected: torch.Tensor, who: str) -> None:
    """Same hot row per slot, and Space-Saving errors equal up to float summation order."""
    words, want = slots[:, 2], expected[:, 2]
    assert torch.equal(hot_rows_of(words), hot_rows_of(want)), f"{who} hot rows"
    torch.testing.assert_close(errors_of(words), errors_of(want), rtol=1e-4, atol=1e-5, msg=f"{who} errors")


def build() -> CafeEmbeddingBagCollection:
    torch.manual_seed(0)
    return CafeEmbeddingBagCollection(
        tables([6000, 4000], features_per_table=[2, 1]),
        CafeConfig(compression_ratio=20, policy="paper", threshold=3.0, decay=0.7, decay_trigger=1.0, seed=5),
    )


def batches(rank: int) -> List[KeyedJaggedTensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    return [zipf_kjt(FEATURES, BATCH, 400, gen, max_len=2, offset=0 if s < 6 else 700) for s in range(STEPS)]


def probes() -> List[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randn(WORLD * BATCH, 24, generator=gen) for _ in range(STEPS)]


def shard(ebc: CafeEmbeddingBagCollection, sharding_type: str, world: int):
    sharders = [CafeEmbeddingBagCollectionSharder()]
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world, compute_device="cpu"),
        constraints={GROUP: ParameterConstraints(sharding_types=[sharding_type])},
    )
    plan = planner.collective_plan(ebc, sharders, dist.GroupMember.WORLD)
    full = ebc.physical.embedding_bags[GROUP].weight.detach().clone()
    dmp = DistributedModelParallel(ebc, device=torch.device("cpu"), plan=plan, sharders=sharders)
    return dmp, full, plan.plan[""][GROUP]


def load_full_weight(dmp, full: torch.Tensor, sharding) -> int:
    """Copy the unsharded weight into this rank's shard (DMP does not on CPU); returns the offset."""
    rank = dist.get_rank()
    for meta in sharding.sharding_spec.shards:
        if meta.placement.rank() == rank:
            offset, rows = meta.shard_offsets[0], meta.shard_sizes[0]
            row_store(dmp.module.physical, GROUP).weight.copy_(full[offset : offset + rows])
            return offset
    return -1


def train_sharded(rank: int, world: int, sharding_type: str) -> Dict[str, object]:
    ebc = build()
    _apply_optimizer_in_backward(torch.optim.SGD, ebc.parameters(), {"lr": LR})
    dmp, full, sharding = shard(ebc, sharding_type, world)
    holds_rows = any(m.placement.rank() == rank for m in sharding.sharding_spec.shards)
    initial = row_store(dmp.module.physical, GROUP).weight.detach().clone() if holds_rows else None  # sharded init
    offset = load_full_weight(dmp, full, sharding)
    outputs = []
    for kjt, probe in zip(batches(rank), probes()):
        out = dmp(kjt).values()
        outputs.append(out.detach().clone())
        (out * probe[rank * BATCH : (rank + 1) * BATCH]).sum().backward()
    module = dmp.module
    result = {"offset": offset, "outputs": outputs, "stats": module.stats()}
    if offset >= 0:
        remap = module.groups[GROUP]
        result.update(
            weight=row_store(module.physical, GROUP).weight.clone(),
            slots=remap.sketch.slots.clone(),
            free=remap.sketch.free_rows().clone(),
            block_rows=remap.layout.physical_rows,
            initial=initial,
        )
    return result


def test_table_wise_equals_unsharded_training_on_the_global_batch() -> None:
    results = run_ranks(train_sharded, WORLD, "table_wise")
    owner = next(r for r in results if r["offset"] >= 0)
    ref = build()
    _apply_optimizer_in_backward(torch.optim.SGD, ref.parameters(), {"lr": LR})
    per_rank = [batches(r) for r in range(WORLD)]
    for step, probe in enumerate(probes()):
        kjts = [per_rank[r][step] for r in range(WORLD)]
        global_kjt = _concat_batches(kjts)
        out = ref(global_kjt).values()
        for r in range(WORLD):  # forward equals the unsharded module, per rank's samples
            torch.testing.assert_close(
                results[r]["outputs"][step], out[r * BATCH : (r + 1) * BATCH].detach(), rtol=1e-5, atol=1e-6
            )
        ((out * probe).sum() / WORLD).backward()
    group = ref.groups[GROUP]
    assert torch.equal(owner["slots"][:, 0], group.sketch.slots[:, 0])  # same tags in the same slots
    assert_same_rows_and_errors(owner["slots"], group.sketch.slots, "owner")
    torch.testing.assert_close(
        owner["weight"], ref.physical.embedding_bags[GROUP].weight.detach(), rtol=1e-4, atol=1e-5
    )
    assert owner["stats"][GROUP]["promotions"] > 5


def _concat_batches(kjts: List[KeyedJaggedTensor]) -> KeyedJaggedTensor:
    """Samples of rank 0, then rank 1 (the order the table-wise owner sees)."""
    values, lengths = [], []
    for f in FEATURES:
        for k in kjts:
            values.append(k[f].values())
            lengths.append(k[f].lengths())
    return KeyedJaggedTensor.from_lengths_sync(keys=FEATURES, values=torch.cat(values), lengths=torch.cat(lengths))


def test_row_wise_equals_a_single_process_run_of_the_per_shard_logic() -> None:
    results = run_ranks(train_sharded, WORLD, "row_wise")
    ebc = build()
    layout = ebc.plan.groups[0]
    full = ebc.physical.embedding_bags[GROUP].weight.detach().clone()
    offsets = [r["offset"] for r in results]
    blocks = [CafeGroupRemap(layout.block(r["block_rows"]), torch.device("cpu")) for r in results]
    bucket = (KEY_SPACE + WORLD - 1) // WORLD  # TorchRec's block bucketization of the key range
    per_rank = [batches(r) for r in range(WORLD)]
    for step, probe in enumerate(probes()):
        kjt = _concat_batches([per_rank[r][step] for r in range(WORLD)])
        grad = probe / WORLD
        expected = torch.zeros(WORLD * BATCH, 24)
        updates = torch.zeros_like(full)
        routed = {r: ([], [], []) for r in range(WORLD)}  # keys, bag, feature
        for fi, f in enumerate(FEATURES):
            jt = kjt[f]
            keys = ebc.keys(f, jt.values())
            bags = torch.arange(WORLD * BATCH).repeat_interleave(jt.lengths())
            for key, bag in zip(keys.tolist(), bags.tolist()):
                r = key // bucket
                row = offsets[r] + int(blocks[r].lookup(torch.tensor([key]), count=False).primary)
                expected[bag, fi * 8 : (fi + 1) * 8] += full[row]
                updates[row] += grad[bag, fi * 8 : (fi + 1) * 8]
                for lst, v in zip(routed[r], (key, bag, fi)):
                    lst.append(v)
        for r in range(WORLD):
            torch.testing.assert_close(
                results[r]["outputs"][step], expected[r * BATCH : (r + 1) * BATCH], rtol=1e-5, atol=1e-6
            )
        full -= LR * updates
        for r in range(WORLD):
            keys, bags, feats = (torch.tensor(x, dtype=torch.int64) for x in routed[r])
            norms = (
                torch.stack([grad[b, f * 8 : (f + 1) * 8].norm() for b, f in zip(bags.tolist(), feats.tolist())])
                if len(keys)
                else torch.zeros(0)
            )
            scores = torch.zeros_like(norms)
            for f in range(3):
                mask = feats == f
                if mask.any():
                    scores[mask] = norms[mask] / norms[mask].mean()
            result = blocks[r].record(keys, scores)
            dst = offsets[r] + result.promoted_rows
            src = offsets[r] + blocks[r].hashed_rows(result.promoted_keys, 1)
            full[dst] = full[src]
    for r, res in enumerate(results):
        # each rank's shard started as a block of the layout: each table's hashed rows from its own init
        for t, (level1, _) in zip(blocks[r].layout.tables, blocks[r].layout.region_offsets()):
            bound = (1 / t.logical_rows) ** 0.5
            assert 0.9 * bound < float(res["initial"][level1 : level1 + t.hashed_rows].abs().max()) <= bound, t.name
        assert torch.equal(res["slots"][:, 0], blocks[r].sketch.slots[:, 0]), f"rank {r} sketch tags"
        assert_same_rows_and_errors(res["slots"], blocks[r].sketch.slots, f"rank {r}")
        torch.testing.assert_close(
            res["weight"], full[res["offset"] : res["offset"] + res["block_rows"]], rtol=1e-4, atol=1e-5
        )
        assert res["stats"][GROUP]["promotions"] > 2


def world_one(rank: int, world: int, sharding_type: str) -> Dict[str, object]:
    """Unsharded module and DMP world size 1, same weights: same outputs, same step."""
    from torchrec.optim import RowWiseAdagrad

    unsharded = build()
    _apply_optimizer_in_backward(RowWiseAdagrad, unsharded.parameters(), {"lr": LR})
    sharded = build()
    _apply_optimizer_in_backward(RowWiseAdagrad, sharded.parameters(), {"lr": LR})
    dmp, full, sharding = shard(sharded, sharding_type, world)
    load_full_weight(dmp, unsharded.physical.embedding_bags[GROUP].weight.detach(), sharding)
    diffs = []
    for kjt, probe in zip(batches(0), probes()):
        a, b = unsharded(kjt).values(), dmp(kjt).values()
        diffs.append(float((a - b).abs().max()))
        (a * probe[:BATCH]).sum().backward()
        (b * probe[:BATCH]).sum().backward()
    weight_diff = float(
        (unsharded.physical.embedding_bags[GROUP].weight - row_store(dmp.module.physical, GROUP).weight).abs().max()
    )
    same_sketch = torch.equal(unsharded.groups[GROUP].sketch.slots[:, 0], dmp.module.groups[GROUP].sketch.slots[:, 0])
    reports = [(m.stats(), m.memory(), m.describe()) for m in (unsharded, dmp.module)]
    return {"diffs": diffs, "weight_diff": weight_diff, "same_sketch": same_sketch, "reports": reports}


def test_unsharded_equals_dmp_world_size_one() -> None:
    for sharding_type in ("table_wise", "row_wise"):
        (result,) = run_ranks(world_one, 1, sharding_type)
        assert max(result["diffs"]) < 1e-5, (sharding_type, result["diffs"])
        assert result["weight_diff"] < 1e-4 and result["same_sketch"], (sharding_type, result)
        unsharded, sharded = result["reports"]  # one stats/memory/describe API, same figures
        assert sharded == unsharded, (sharding_type, result["reports"])
        assert (
            unsharded[0][GROUP]["promotions"] > 0 and unsharded[1]["local_weight_bytes"] == unsharded[1]["weight_bytes"]
        )


def rowwise_memory(rank: int, world: int) -> Dict[str, float]:
    ebc = build()
    _apply_optimizer_in_backward(torch.optim.SGD, ebc.parameters(), {"lr": LR})
    dmp, _, _ = shard(ebc, "row_wise", world)
    held = sum(b.numel() * b.element_size() for b in dmp.module.groups.buffers())
    derived = [t for g in dmp.module.groups.values() for t in (g.regions, g.lookup_counts, g.migration_counts)]
    held += sum(t.numel() * t.element_size() for t in derived)  # plain attributes, not buffers
    return {**dmp.module.memory(), "buffer_bytes": held}


def test_row_wise_memory_counts_every_rank_sketch() -> None:
    """A row-wise group keeps one sketch per block (each with its own rounded bucket count and
    fixed buffers): memory() counts those, so the ratio is the one the ranks really hold."""
    results = run_ranks(rowwise_memory, WORLD)
    assert all(r["local_sketch_bytes"] == r["buffer_bytes"] for r in results)
    assert all(r["sketch_bytes"] == sum(q["local_sketch_bytes"] for q in results) for r in results)
    assert results[0]["sketch_bytes"] != build().memory()["sketch_bytes"]  # not the unsharded layout's
