"""Examples, collation, the data order, sharding across processes and DDD's prompt partitions."""

from __future__ import annotations

import pytest
import torch

from epikern.training.batches import IGNORE, EpochSampler, Example, collate, partition_prompts, shard


def test_collate_right_pads_and_shifts_labels():
    batch = collate([Example((5, 6, 7, 8), 2), Example((9, 10, 11), 1)], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 11, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    # position t predicts token t + 1; only the tokens after the prompt count
    assert batch["labels"].tolist() == [[IGNORE, 7, 8, IGNORE], [10, 11, IGNORE, IGNORE]]
    assert int((batch["labels"] != IGNORE).sum()) == 4 == sum(e.num_targets for e in
                                                             [Example((5, 6, 7, 8), 2), Example((9, 10, 11), 1)])


@pytest.mark.parametrize("prompt_length", [0, 3])
def test_example_needs_a_prompt_and_a_target(prompt_length):
    with pytest.raises(ValueError, match="1 <= prompt_length < len"):
        Example((1, 2, 3), prompt_length)


def test_sampler_is_a_function_of_seed_and_step_and_covers_every_epoch():
    s = EpochSampler(10, 4, seed=3)
    stream = [i for step in range(5) for i in s.batch(step)]  # 20 indices = 2 epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]  # each epoch its own order
    assert EpochSampler(10, 4, seed=3).batch(3) == s.batch(3)
    assert EpochSampler(10, 4, seed=4).batch(0) != s.batch(0)


def test_shard_splits_the_global_batch_contiguously():
    assert shard([4, 5, 6, 7], 0, 2) == [4, 5] and shard([4, 5, 6, 7], 1, 2) == [6, 7]
    with pytest.raises(ValueError, match="does not split evenly across 2 processes"):
        shard([1, 2, 3], 0, 2)


@pytest.mark.parametrize("num_prompts, partitions", [(10, 3), (7, 7), (100, 4), (5, 1)])
def test_ddd_partitions_are_disjoint_and_cover_all_prompts(num_prompts, partitions):
    parts = partition_prompts(num_prompts, partitions, seed=0)
    assert len(parts) == partitions and all(parts)
    flat = [p for part in parts for p in part]
    assert sorted(flat) == list(range(num_prompts))  # covering and disjoint
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert partition_prompts(num_prompts, partitions, seed=0) == parts


def test_ddd_partition_errors():
    with pytest.raises(ValueError, match="more partitions than prompts"):
        partition_prompts(3, 4, seed=0)
    with pytest.raises(ValueError, match="must be a positive int, got 0"):
        partition_prompts(3, 0, seed=0)
