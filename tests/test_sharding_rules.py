"""The row-wise rule every user of it shares: no rank's block may be empty (FBGEMM's CPU
backward misbehaves on a 0-row table). The sharder refuses such a plan; the planner and the
example trainer shard such tables table-wise."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest
from torchrec.distributed.types import EnumerableShardingSpec, ParameterSharding, ShardMetadata

from cafe_planner.placement import PhysicalTable, row_wise_ok
from cafe_torchrec import CafeConfig, CafeEmbeddingBagCollection
from cafe_torchrec.distributed.sharder import (
    CafeEmbeddingBagCollectionSharder,
    every_rank_has_rows,
    row_wise_shard_rows,
)
from examples.dlrm.sharding import sharding_constraints
from tests.helpers import tables


def test_row_wise_blocks_are_torchrec_s_and_an_empty_block_breaks_the_rule() -> None:
    assert row_wise_shard_rows(10, 4) == [3, 3, 3, 1]
    assert row_wise_shard_rows(9, 4) == [3, 3, 3, 0]  # ceil(9 / 4) = 3 rows each: the last rank gets none
    assert every_rank_has_rows(row_wise_shard_rows(10, 4))
    assert not every_rank_has_rows(row_wise_shard_rows(9, 4))


def test_planner_and_trainer_keep_a_table_with_an_empty_block_table_wise() -> None:
    assert row_wise_ok(PhysicalTable("t", 10, 8, 4, ("f",)), 4)
    assert not row_wise_ok(PhysicalTable("t", 9, 8, 4, ("f",)), 4)
    spec = SimpleNamespace(physical_tables=lambda: {"fits": 10, "empty_rank": 9}, is_cafe=True)
    constraints = sharding_constraints(argparse.Namespace(sharding="row_wise"), spec, world=4)
    assert constraints["fits"].sharding_types == ["row_wise"]
    assert constraints["empty_rank"].sharding_types == ["table_wise"]


def test_the_trainer_never_shards_an_embedding_table_data_parallel() -> None:
    """Data-parallel tables would train with the dense optimizer, not the embedding one the
    methods are compared with (a review found hashing's small tables trained so)."""
    spec = SimpleNamespace(physical_tables=lambda: {"small": 10, "big": 10_000}, is_cafe=False)
    constraints = sharding_constraints(argparse.Namespace(sharding="auto"), spec, world=1)
    assert set(constraints) == {"small", "big"}
    assert all(
        "data_parallel" not in c.sharding_types and "table_wise" in c.sharding_types for c in constraints.values()
    )
    # CAFE's sharder offers no data-parallel: its tables keep CafePlanner's defaults
    cafe = SimpleNamespace(physical_tables=lambda: {"cafe_dim16": 10_000}, is_cafe=True)
    assert sharding_constraints(argparse.Namespace(sharding="auto"), cafe, world=1) == {}


def test_sharder_refuses_a_row_wise_plan_with_an_empty_block() -> None:
    ebc = CafeEmbeddingBagCollection(tables([5000], dim=8), CafeConfig(compression_ratio=2))
    name, rows = ebc.plan.groups[0].name, ebc.plan.groups[0].physical_rows
    shards = [
        ShardMetadata(shard_offsets=[0, 0], shard_sizes=[rows, 8], placement="rank:0/cpu"),
        ShardMetadata(shard_offsets=[rows, 0], shard_sizes=[0, 8], placement="rank:1/cpu"),
    ]
    plan = {
        name: ParameterSharding(
            sharding_type="row_wise", compute_kernel="fused", ranks=[0, 1], sharding_spec=EnumerableShardingSpec(shards)
        )
    }
    with pytest.raises(ValueError, match="leaves a rank with no rows"):
        CafeEmbeddingBagCollectionSharder().shard(ebc, plan, env=None)


@pytest.mark.parametrize("kernel", ["dense", "quant", "fused_uvm_caching"])
def test_sharder_refuses_a_group_kernel_without_a_fused_optimizer(kernel: str) -> None:
    """A dense kernel once sharded and trained a step, then failed inside backward at the first
    migration (no fused optimizer state); quant failed on one rank only; a caching kernel's hot
    rows live in its cache, which a migration's in-place writes do not reach."""
    ebc = CafeEmbeddingBagCollection(tables([5000], dim=8), CafeConfig(compression_ratio=2))
    name, rows = ebc.plan.groups[0].name, ebc.plan.groups[0].physical_rows
    spec = EnumerableShardingSpec([ShardMetadata(shard_offsets=[0, 0], shard_sizes=[rows, 8], placement="rank:0/cpu")])
    plan = {name: ParameterSharding(sharding_type="table_wise", compute_kernel=kernel, ranks=[0], sharding_spec=spec)}
    with pytest.raises(ValueError, match=f"CAFE table '{name}': compute kernel '{kernel}' is not supported"):
        CafeEmbeddingBagCollectionSharder().shard(ebc, plan, env=None)
