"""A flush takes up to ``max_batch`` waiting items, bounded by ``max_batch_bytes``: when
everything waiting fits the byte bound the batch is taken at once (issue 16), and its
``nbytes`` must still be the sum of its own items, not of everything that was waiting."""

from __future__ import annotations

import pytest

from asyncstore.orchestrator.batching import Batch, BatchConfig, BatchWriter


class Sink:
    def __init__(self) -> None:
        self.batches: list[tuple[list[int], int]] = []

    async def __call__(self, batch: Batch[int]) -> None:
        self.batches.append((list(batch.items), batch.nbytes))


@pytest.mark.parametrize(
    ("max_batch_bytes", "expected"),
    [
        (None, [([1, 2, 3], 6), ([4, 5], 9)]),  # no byte bound: whole batches at once
        (1_000, [([1, 2, 3], 6), ([4, 5], 9)]),  # everything fits the bound: the same
        (7, [([1, 2, 3], 6), ([4], 4), ([5], 5)]),  # the bound cuts batches item by item
    ],
    ids=["no-byte-bound", "all-fit", "byte-bound"],
)
async def test_a_batch_counts_the_bytes_of_its_own_items(
    max_batch_bytes: int | None, expected: list[tuple[list[int], int]]
) -> None:
    sink = Sink()
    config = BatchConfig(max_batch=3, max_batch_bytes=max_batch_bytes, flush_interval_s=60)
    async with BatchWriter(sink, config) as writer:
        for i in range(1, 6):  # no await in between: all five wait for the first flush
            writer.put_nowait(i, nbytes=i)
        await writer.flush()
        stats = writer.statistics()
        assert (stats.pending, stats.in_flight, stats.buffered_bytes) == (0, 0, 0)
    assert sink.batches == expected
