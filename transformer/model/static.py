"""Decoding with a static-shape KV cache, its decoder step replayed as a CUDA graph.

At small batches a GPU decoder step is limited by kernel launches, not arithmetic: the 7.6M-parameter
Multi30k model spent about 1.8 ms a generated token launching a few hundred small kernels from Python
(BENCHMARKS.md, GPU). A CUDA graph records those launches once and replays them with one call, but it
replays fixed shapes at fixed addresses. So the step here works on buffers that never move:

* every decoder layer's self-attention keys and values live in one preallocated buffer of
  ``(rows, L, 2, H, T, Dh)``; a step writes its keys/values at the position held in a device tensor
  (``index_copy_``) and attends over the first ``t_bucket`` positions with a mask ``position <= step``;
* the source's cross-attention keys/values (``(rows, L, 2, H, S, Dh)``) and its padding mask are copied in at
  the first step of a search, padded to ``s_bucket`` positions (masked out);
* the new tokens are copied into a fixed input buffer, and the logits come out of a fixed output tensor.

A graph is recorded per ``(row bucket, s_bucket, t_bucket)``: rows are rounded up to a bucket (1, 2, 4, 8,
then multiples of 8, then of 32), the source length to a multiple of ``S_BLOCK`` and the target positions to
a multiple of ``T_BLOCK``. Rows beyond the live ones in a bucket hold stale but finite values and are never
read back. When sentences finish, the searches' ``reorder`` compacts the live rows to the front of the
buffers in place, so the next step replays a smaller bucket's graph; beam search's ``reorder_beams`` permutes
the self-attention history only. Graphs and buffers belong to the model (a :class:`StaticDecoder`) and are
kept across searches; a larger batch, source or output than the buffers hold reallocates them (the output
length, and the rows when beam search expands its first step's one row per sentence to its beams, in place
mid-search) and records the graphs again.

One search at a time: the buffers are the model's, so a cache from :meth:`StaticDecoder.new_cache` is
superseded by the next one's first step, and using it afterwards raises a :class:`TransformerError`.

A decoder-only language model works the same way without the source buffers; its prompt goes through the
step one position at a time (:class:`~transformer.model.frozen.FrozenLM`).

On the CPU, or with ``graphs=False``, the same static step runs eagerly (what the CPU tests check against the
growing :class:`~transformer.model.DecoderCache`).

Shapes: n live rows, b its row bucket, L layers, H heads, Dh head width, D model width, V vocabulary.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from transformer.errors import TransformerError
from transformer.model.embeddings import check_positions
from transformer.model.layers import LayerCache

S_BLOCK = 32  # source positions are padded to a multiple of this (SDPA's memory-efficient kernel wants 16)
T_BLOCK = 64  # target positions attended to, a multiple of this


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block


def row_bucket(n: int) -> int:
    """The graph's row count for ``n`` live rows: 1, 2, 4, 8, then multiples of 8 up to 64, then of 32."""
    if n <= 8:
        return 1 << (n - 1).bit_length()
    return _round_up(n, 8) if n <= 64 else _round_up(n, 32)


class _StaticKV:
    """One layer's view of the static self-attention history: what ``_FrozenLayer`` calls ``cache.update``."""

    def __init__(self, k: Tensor, v: Tensor, position: Tensor) -> None:
        self.k, self.v, self.position = k, v, position  # (b,H,T,Dh) views, (1,) long

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write the step's k, v (b,H,1,Dh) at ``position``; return the whole (b,H,T,Dh) history."""
        self.k.index_copy_(2, self.position, k)
        self.v.index_copy_(2, self.position, v)
        return self.k, self.v


class StaticCache:
    """A search's handle on the :class:`StaticDecoder`'s buffers: how many rows are live, how many positions
    are decoded. ``reorder`` / ``reorder_beams`` move the rows in the shared buffers, in place."""

    def __init__(self, decoder: "StaticDecoder") -> None:
        self.decoder = decoder
        self.rows = 0  # live rows, 0 before the first step
        self.length = 0  # target positions decoded

    @property
    def holds_source(self) -> bool:
        """Whether the buffers hold the source's keys/values (from the first step on): ``reorder`` moves them,
        and the search's encoder output is not read again (searches then skip reordering it)."""
        return self.rows > 0

    def reorder(self, new_order: Tensor) -> None:
        """Keep rows ``new_order`` (n',) of the live rows, moved to the front; their sources go with them."""
        self.decoder.reorder(self, new_order, sources_changed=True)

    def reorder_beams(self, new_order: Tensor) -> None:
        """Like :meth:`reorder` when every row keeps its source: only the self-attention history moves."""
        self.decoder.reorder(self, new_order, sources_changed=False)


class StaticDecoder:
    """The frozen decoder step (:class:`~transformer.model.frozen._FrozenDecoder`) on static buffers,
    replayed as CUDA graphs where ``graphs`` is true (see the module docstring).

    Args:
        decoder: the frozen decoder stack and output layer (with cross-attention, or without: a language model).
        n_heads: attention heads H.
        graphs: record and replay CUDA graphs (needs the weights on a CUDA device); otherwise run eagerly.
    """

    def __init__(self, decoder: Any, n_heads: int, graphs: bool) -> None:
        self.decoder = decoder
        self.n_layers = len(decoder.layers)
        self.cross = decoder.cross  # encoder-decoder; False for a language model
        self.n_heads = n_heads
        self.head_dim = decoder.d_model // n_heads
        weight = decoder.embed
        self.device, self.dtype = weight.device, weight.dtype
        if graphs and self.device.type != "cuda":
            raise TransformerError(f"CUDA graphs need the model on a CUDA device, not {self.device.type}")
        self.graphs_enabled = graphs
        self.owner: Optional[StaticCache] = None  # the search whose state the buffers hold
        self.capacity = (0, 0, 0)  # rows, source positions, target positions the buffers hold
        self.graphs: dict[tuple[int, int, int], tuple[Any, Tensor]] = {}  # (b, s_bucket, t_bucket) -> graph, logits
        self.pool = None
        self.recorded = 0  # graphs recorded so far (tests and benchmarks read it)

    # --- buffers -------------------------------------------------------------------------------------

    def _allocate(self, rows: int, src_len: int, tgt_len: int, keep: int = 0) -> None:
        """Buffers for ``rows`` x ``src_len`` x ``tgt_len``; the first ``keep`` rows' state (self-attention
        history, source keys/values and mask) is carried over (an output or a beam search's rows growing
        mid-search). Every recorded graph is dropped."""
        old = self.capacity
        rows, src_len = max(rows, old[0]), max(src_len, old[1])
        tgt_len = max(tgt_len, old[2])
        h, dh, n = self.n_heads, self.head_dim, self.n_layers
        with torch.inference_mode(False):  # normal tensors: writable in and out of inference mode
            kv = torch.zeros(rows, n, 2, h, tgt_len, dh, device=self.device, dtype=self.dtype)
            if keep:
                kv[:keep, :, :, :, : old[2]] = self.kv[:keep]
            self.kv = kv  # (rows,L,2,H,T,Dh): self-attention keys and values
            if self.cross and (src_len > old[1] or rows > old[0]):
                cross_kv = torch.zeros(rows, n, 2, h, src_len, dh, device=self.device, dtype=self.dtype)
                memory_mask = torch.ones(rows, 1, 1, src_len, dtype=torch.bool, device=self.device)
                if keep:
                    cross_kv[:keep, :, :, :, : old[1]] = self.cross_kv[:keep]
                    memory_mask[:keep, :, :, : old[1]] = self.memory_mask[:keep]
                self.cross_kv, self.memory_mask = cross_kv, memory_mask
            if rows > old[0]:
                self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=self.device)  # (rows,1)
            if not old[0]:
                self.position = torch.zeros(1, dtype=torch.long, device=self.device)  # (1,) the step's position
                self.t_range = torch.arange(self.decoder.max_positions, device=self.device)
        self.capacity = (rows, src_len, tgt_len)
        self.graphs.clear()
        self.pool = None  # the graphs' memory pool goes with them (PyTorch frees a pool no graph uses)

    def _start(self, cache: StaticCache, n: int, cross_kv: Optional[list[tuple[Tensor, Tensor]]],
               src_mask: Optional[Tensor]) -> None:
        """The first step of a search over ``n`` rows: claim the buffers and copy the source's keys/values in."""
        s = cross_kv[0][0].size(2) if self.cross else 0  # (n,H,S,Dh)
        s_bucket = _round_up(s, S_BLOCK)
        rows, src_cap, tgt_cap = self.capacity
        if n > rows or s_bucket > src_cap or tgt_cap == 0:
            self._allocate(row_bucket(n), s_bucket, min(T_BLOCK, self.decoder.max_positions))
        self.owner = cache
        cache.rows, cache.s_bucket = n, s_bucket
        if not self.cross:
            return
        # (n,L,2,H,S,Dh) <- per layer (n,H,S,Dh) keys and values
        self.cross_kv[:n, :, :, :, :s] = torch.stack([torch.stack(kv, dim=1) for kv in cross_kv], dim=1)
        self.memory_mask[:n, 0, 0, :s] = src_mask
        self.memory_mask[:n, 0, 0, s:s_bucket] = False

    def _check(self, cache: StaticCache) -> None:
        if self.owner is not cache:
            raise TransformerError("this decoding cache was superseded: a static-cache (CUDA graph) model "
                                   "decodes one search at a time")

    # --- the step ------------------------------------------------------------------------------------

    def _step(self, b: int, s_bucket: int, t_bucket: int) -> Tensor:
        """The decoder step on the first ``b`` rows of the buffers -> logits (b,V); no host reads."""
        dec = self.decoder
        x = dec.embed_tokens(self.tokens[:b], position=self.position)  # (b,D)
        self_mask = (self.t_range[:t_bucket] <= self.position).view(1, 1, 1, t_bucket)  # keys decoded so far
        memory_mask = self.memory_mask[:b, :, :, :s_bucket] if self.cross else None  # (b,1,1,S)
        for i, layer in enumerate(dec.layers):
            history = _StaticKV(self.kv[:b, i, 0, :, :t_bucket], self.kv[:b, i, 1, :, :t_bucket], self.position)
            cross = None
            if self.cross:
                cross = (self.cross_kv[:b, i, 0, :, :s_bucket], self.cross_kv[:b, i, 1, :, :s_bucket])  # (b,H,S,Dh)
            x = layer(x, b, 1, LayerCache(self_attn=history), self_mask, False, cross, memory_mask)
        return dec.logits(x)  # (b,V)

    def _replay(self, key: tuple[int, int, int]) -> Tensor:
        entry = self.graphs.get(key)
        if entry is None:
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()  # one memory pool for every graph (replayed in turn)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up before recording (the same inputs: it writes what the step writes)
                self._step(*key)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                logits = self._step(*key)
            entry = self.graphs[key] = (graph, logits)
            self.recorded += 1
        graph, logits = entry
        graph.replay()
        return logits

    def decode(self, tokens: Tensor, cross_kv: Optional[list[tuple[Tensor, Tensor]]], src_mask: Optional[Tensor],
               cache: StaticCache) -> Tensor:
        """tokens (n,1) -> logits (n,1,V) of the next position, appending its keys/values to the buffers.

        ``cross_kv`` (per layer, each (n,H,S,Dh)) and ``src_mask`` (n,S) are read at the first step only;
        afterwards the buffers hold them (and ``cache.reorder`` moves them). A language model passes None.
        """
        if tokens.size(1) != 1:
            raise TransformerError("a static-cache decoder takes one new position per step")
        if cache.rows == 0:
            self._start(cache, tokens.size(0), cross_kv, src_mask)
        self._check(cache)
        n, t = cache.rows, cache.length
        if tokens.size(0) != n:
            raise TransformerError(f"{tokens.size(0)} rows of tokens for a cache of {n} rows")
        check_positions(t + 1, self.decoder.max_positions)
        t_bucket = min(_round_up(t + 1, T_BLOCK), self.decoder.max_positions)
        rows, src_cap, tgt_cap = self.capacity
        if t_bucket > tgt_cap:  # a longer output than the buffers hold: grow them, keeping this search's history
            self._allocate(rows, src_cap, min(max(2 * tgt_cap, t_bucket), self.decoder.max_positions), keep=n)
        self.tokens[:n].copy_(tokens)
        self.position.fill_(t)
        key = (min(row_bucket(n), self.capacity[0]), cache.s_bucket, t_bucket)
        logits = self._replay(key) if self.graphs_enabled else self._step(*key)
        cache.length = t + 1
        return logits[:n].clone().unsqueeze(1)  # (n,1,V), a copy: the graph's output is overwritten next step

    def reorder(self, cache: StaticCache, new_order: Tensor, sources_changed: bool) -> None:
        """Rows ``new_order`` (n',) of the ``cache.rows`` live ones become rows 0..n'-1 of the buffers."""
        self._check(cache)
        n = new_order.numel()
        if n > self.capacity[0]:  # more rows than the buffers hold (beam search after its first step): grow them
            self._allocate(row_bucket(n), self.capacity[1], self.capacity[2], keep=cache.rows)
        t = cache.length  # only the positions decoded so far
        self.kv[:n, :, :, :, :t] = self.kv[:, :, :, :, :t].index_select(0, new_order)
        if sources_changed and self.cross:
            self.cross_kv[:n] = self.cross_kv.index_select(0, new_order)
            self.memory_mask[:n] = self.memory_mask.index_select(0, new_order)
        cache.rows = n

    def new_cache(self) -> StaticCache:
        return StaticCache(self)
