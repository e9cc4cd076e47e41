"""Length buckets for one micro-batch: which rows go through the model together, padded to their own longest.

A right-padded batch of R rows costs about R * (longest row) tokens of compute, however short most rows
are. Splitting the rows, sorted by length, into K contiguous buckets and running one forward per bucket
costs sum_k (rows in k) * (longest in k) padded tokens plus K times a fixed per-forward cost (kernel
launches, Python, the layer loop; forward and backward). `plan_buckets` picks the buckets with a small
exact dynamic programme over the sorted distinct lengths (a bucket boundary inside a run of equal
lengths never saves padding, so cutting only between distinct lengths loses nothing):

    best[j] = min over i < j of best[i] + rows(i..j) * length[j] + forward_cost      (auto: any K)
    best[k][j] = min over i < j of best[k-1][i] + rows(i..j) * length[j]              (int K: at most K)

`padding_buckets="auto"` minimises padded tokens + FORWARD_COST_TOKENS per forward; an int K minimises
padded tokens with at most K buckets (1 = one forward over the whole batch, the behaviour before
bucketing). Ties go to fewer buckets, so equal lengths always give one bucket. The per-row results are
put back in the original row order by trainables/logprobs.forward_logps, so the math is unchanged.
Pure Python (no torch); tested by `python -m pytest tests/test_bucketing.py -q`.
"""

from __future__ import annotations

from typing import Sequence, Union

from trainables.settings import check_padding_buckets

PaddingBuckets = Union[int, str]  # "auto" or an int >= 1

# Fixed cost of one extra forward + backward, in padded tokens of the same batch. Measured on 2 CPU cores with the
# embedded 1M-parameter demo Llama (64 rows of 13-21 tokens): an extra forward+backward costs about 12 ms, a padded
# token about 0.05 ms, so ~250 tokens. Larger models make tokens dearer and a launch relatively cheaper, so this
# errs towards fewer buckets: "auto" splits only where a cut removes more than 256 padded tokens.
FORWARD_COST_TOKENS = 256


def _prefix_sums(counts: Sequence[int]) -> list[int]:
    prefix = [0]
    for count in counts:
        prefix.append(prefix[-1] + count)
    return prefix


def _best_ends_any_count(counts: Sequence[int], values: Sequence[int], forward_cost: float) -> list[int]:
    """End indices (exclusive) of the groups of the distinct lengths `values` (ascending) that minimise
    sum (rows in group) * (largest value in group) + forward_cost per group; ties go to fewer groups. O(d^2)."""
    prefix, distinct = _prefix_sums(counts), len(values)
    best: list[tuple[float, int]] = [(0.0, 0)] + [(float("inf"), 0)] * distinct  # (cost, groups) of the first j
    back = [0] * (distinct + 1)
    for j in range(1, distinct + 1):
        for i in range(j):
            candidate = (best[i][0] + (prefix[j] - prefix[i]) * values[j - 1] + forward_cost, best[i][1] + 1)
            if candidate < best[j]:
                best[j], back[j] = candidate, i
    ends, j = [], distinct
    while j:
        ends.append(j)
        j = back[j]
    return ends[::-1]


def _best_ends_at_most(counts: Sequence[int], values: Sequence[int], max_groups: int) -> list[int]:
    """Like _best_ends_any_count without a per-group cost, with at most `max_groups` groups. O(K d^2)."""
    prefix, distinct = _prefix_sums(counts), len(values)
    if max_groups >= distinct:
        return list(range(1, distinct + 1))  # one group per distinct length: no padding at all
    infinity = float("inf")
    # best[k][j]: padded tokens of the first j distinct lengths in exactly k groups; back[k][j]: where the last starts.
    best = [[infinity] * (distinct + 1) for _ in range(max_groups + 1)]
    back = [[0] * (distinct + 1) for _ in range(max_groups + 1)]
    best[0][0] = 0.0
    for k in range(1, max_groups + 1):
        for j in range(k, distinct + 1):
            for i in range(k - 1, j):
                cost = best[k - 1][i] + (prefix[j] - prefix[i]) * values[j - 1]
                if cost < best[k][j]:
                    best[k][j], back[k][j] = cost, i
    chosen = min(range(1, max_groups + 1), key=lambda k: (best[k][distinct], k))  # the fewest groups on a tie
    ends, j = [], distinct
    for k in range(chosen, 0, -1):
        ends.append(j)
        j = back[k][j]
    return ends[::-1]


def plan_buckets(lengths: Sequence[int], padding_buckets: PaddingBuckets,
                 forward_cost_tokens: float = FORWARD_COST_TOKENS) -> list[list[int]]:
    """Row indices grouped into buckets of ascending length; each row appears in exactly one bucket.

    lengths: real (non-pad) tokens of each row. padding_buckets: "auto" (padded tokens + forward_cost_tokens
    per bucket, any number of buckets) or an int K >= 1 (fewest padded tokens with at most K buckets).
    Rows of one length stay together, in their original order.
    """
    try:
        check_padding_buckets(padding_buckets)
    except ValueError as error:
        raise ValueError(f"padding_buckets={padding_buckets!r}: {error}") from None
    rows = list(range(len(lengths)))
    if padding_buckets == 1 or len(rows) <= 1:
        return [rows]
    order = sorted(rows, key=lambda row: lengths[row])  # stable: equal lengths keep their order
    values = sorted(set(lengths))
    counts = [0] * len(values)
    position = {value: index for index, value in enumerate(values)}
    for length in lengths:
        counts[position[length]] += 1
    if padding_buckets == "auto":
        ends = _best_ends_any_count(counts, values, forward_cost_tokens)
    else:
        ends = _best_ends_at_most(counts, values, int(padding_buckets))
    buckets, start_row, start_value = [], 0, 0
    for end in ends:
        size = sum(counts[start_value:end])
        buckets.append(order[start_row : start_row + size])
        start_row, start_value = start_row + size, end
    return buckets


def padded_tokens(lengths: Sequence[int], buckets: Sequence[Sequence[int]]) -> int:
    """Tokens the buckets put through the model: each bucket's rows times its longest row."""
    return sum(len(bucket) * max(lengths[row] for row in bucket) for bucket in buckets)
