"""The pooled decoding attention on its own (no model): a row's result is bitwise the one it gets
alone, whatever the other rows, their lengths and the pool's size; and it is attention."""

from __future__ import annotations

import types
from typing import Any

import pytest
import torch

from inference.batching import SPAN, KvPool, Row, _rows_attention

LAYERS, HEADS, KV_HEADS, DIM = 2, 9, 3, 64


def row(length: int, capacity: int) -> Row:
    seq = Row(prompt=[0] * (capacity - 8), max_tokens=8, adapter=None, temperature=0.0,
              seed=None, sink=lambda _: None)
    seq.length = length
    return seq


def caches(seed: int, capacity: int) -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(seed)
    shape = (LAYERS, KV_HEADS, capacity, DIM)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def step(rows: list[Row], data: dict[int, tuple[Any, ...]], padding: int = 0) -> Any:
    """One decoding step's attention, layer 1, for `rows` (plus `padding` rows)."""
    length = -(-max(s.capacity for s in rows) // SPAN) * SPAN
    pool = KvPool(rows, (LAYERS, len(rows), KV_HEADS, length, DIM))
    for i, seq in enumerate(rows):
        keys, values = data[id(seq)][:2]
        pool.keys[:, i, :, :seq.length] = keys[:, :, :seq.length]
        pool.values[:, i, :, :seq.length] = values[:, :, :seq.length]
    pool.begin()
    query = torch.cat([data[id(s)][2] for s in rows] + [torch.ones(padding, HEADS, 1, DIM)])
    key = torch.cat([data[id(s)][3] for s in rows] + [torch.ones(padding, KV_HEADS, 1, DIM)])
    value = torch.cat([data[id(s)][4] for s in rows] + [torch.ones(padding, KV_HEADS, 1, DIM)])
    module = types.SimpleNamespace(layer_idx=1)
    out, _ = _rows_attention(module, query, key, value, None, scaling=DIM ** -0.5, kv_pool=pool)
    assert out.shape == (len(rows) + padding, 1, HEADS, DIM)
    if padding:
        assert not out[len(rows):].any()
    return out[:len(rows)]


@pytest.mark.parametrize("threads", [1, 2])
def test_a_row_attends_alike_alone_and_in_any_batch(threads: int) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        lengths = [3, 15, 16, 17, 37, 45, 63, 64, 65, 130, 200]
        rows = [row(n, n + 1 + 9 * (i % 3)) for i, n in enumerate(lengths)]
        data: dict[int, tuple[Any, ...]] = {}
        for i, seq in enumerate(rows):
            g = torch.Generator().manual_seed(100 + i)
            data[id(seq)] = (*caches(i, seq.capacity), torch.randn(1, HEADS, 1, DIM, generator=g),
                             torch.randn(1, KV_HEADS, 1, DIM, generator=g),
                             torch.randn(1, KV_HEADS, 1, DIM, generator=g))
        alone = [step([s], data, padding=3)[0] for s in rows]
        for batch in (rows, rows[::-1], rows[3:7], [rows[0], rows[-1]], rows[1::2]):
            together = step(batch, data)
            for i, seq in enumerate(batch):
                assert torch.equal(together[i], alone[rows.index(seq)]), (seq.length, len(batch))
    finally:
        torch.set_num_threads(before)


def test_it_is_causal_attention_over_the_row_tokens_and_the_new_one() -> None:
    seq = row(37, 48)
    keys, values = caches(0, seq.capacity)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, h, 1, DIM, generator=g) for h in (HEADS, KV_HEADS, KV_HEADS))
    out = step([seq], {id(seq): (keys, values, q, k, v)})
    full_k = torch.cat([keys[1, :, :37], k[0]], dim=1).repeat_interleave(HEADS // KV_HEADS, 0)
    full_v = torch.cat([values[1, :, :37], v[0]], dim=1).repeat_interleave(HEADS // KV_HEADS, 0)
    weights = torch.softmax(q[0] @ full_k.transpose(-1, -2) * DIM ** -0.5, dim=-1)
    expected = (weights @ full_v).transpose(0, 1)  # [1 new token, heads, dim]
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-5)


def test_draft_rows_attend_as_their_owner_decoding_them_one_by_one() -> None:
    """A row's next token and two draft tokens in one step (the drafts in the row's own slot,
    at the next positions) get bitwise the attention the row gets decoding them one a step."""
    seq = row(37, 48)
    keys, values = caches(0, seq.capacity)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(3, h, 1, DIM, generator=g) for h in (HEADS, KV_HEADS, KV_HEADS))
    module = types.SimpleNamespace(layer_idx=1)

    def fresh() -> KvPool:
        pool = KvPool([seq], (LAYERS, 1, KV_HEADS, 64, DIM))
        pool.keys[:, 0, :, :37] = keys[:, :, :37]
        pool.values[:, 0, :, :37] = values[:, :, :37]
        return pool

    def padded(x: Any, rows: slice) -> Any:
        return torch.cat([x[rows], torch.ones(4 - len(x[rows]), *x.shape[1:])])

    one_a_step, pool, seq.length = [], fresh(), 37
    for t in range(3):
        pool.begin()
        out, _ = _rows_attention(module, padded(q, slice(t, t + 1)), padded(k, slice(t, t + 1)),
                                 padded(v, slice(t, t + 1)), None, scaling=DIM ** -0.5,
                                 kv_pool=pool)
        one_a_step.append(out[0])
        seq.length += 1
    pool, seq.length = fresh(), 37
    pool.begin([(0, 38), (0, 39)])
    out, _ = _rows_attention(module, padded(q, slice(0, 3)), padded(k, slice(0, 3)),
                             padded(v, slice(0, 3)), None, scaling=DIM ** -0.5, kv_pool=pool)
    for t in range(3):
        assert torch.equal(out[t], one_a_step[t]), t
    assert not out[3].any()  # the padding row
