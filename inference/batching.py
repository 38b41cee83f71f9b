"""Continuous batching for the embedded engine: one decoding loop shared by every request.

A request is prefilled the moment it is admitted (its prompt in one forward pass; in bf16,
together with the other prompts admitted at once on the same adapter, see PACK_ROWS), then
joins the running batch: each decoding step is one forward pass with one row per request, every
row with its own LoRA adapter (`Routing`: per-row adapters, as peft's `adapter_names` gives; the
base model is `"__base__"`). A request leaves the batch when it stops, runs out of tokens or is
cancelled; the others carry on.

Why not transformers' own continuous batching (`generate_batch`, `ContinuousBatchingManager`)?
It packs every request's tokens into a single row with paged attention, so peft cannot route
rows to different adapters, and its streaming is per-token output objects on its own thread; the
row-per-request layout here keeps peft's per-row adapters and stays small.

A request's prompt is prefilled into a cache of its own (one fp32 tensor sized for its prompt plus
`max_tokens`; SmolLM2-135M: 46 KB a token); decoding rows then share one pooled cache
(`KvPool`: [layers, rows, kv_heads, length, head_dim], the rows' tokens from position 0, the
length a multiple of `SPAN`), and each layer attends for every row in one call (`_rows_attention`,
plugged in as a transformers attention implementation): the scores over the first positions
rounded up to `SPAN`, the others' and the free positions masked out. A row's attention is then
computed alike alone and in any batch: the vectorised sums see whole `SPAN` chunks, the masked
positions add exact zeros. Decoding steps run whole blocks of `ROW_BLOCK` rows (the matrix
kernels then round every row alike): a request's greedy output is the one it gets alone,
whatever else shares its batch. Their products use linear weights reordered once at load for
oneDNN's few-row kernels (`pack_weights`), prefill the plain ones. A step's padding rows are
not wasted on greedy rows: they decode draft tokens guessed by prompt lookup (`_drafts`),
checked by the row's own next tokens, so a lone row, which answers quoting approved answers
often are, makes up to `ROW_BLOCK` tokens a step with the output it gets one token a step.
Memory is bounded by `max_batch` rows and `max_kv_tokens` cache tokens: reserved ones (each
request's prompt plus `max_tokens`) and the pooled cache's (rows x its length) alike; requests
beyond wait in FIFO order.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from inference.base import Finished
from inference.errors import AdapterNotFound, ContextTooLong, InferenceError

ATTENTION = "chatloop_rows"  # the registered transformers attention implementation
BASE = "__base__"  # peft's adapter name for rows that use the base model
# Decoding steps run a multiple of this many rows (padding rows are computed and dropped): CPU
# matrix kernels round a row differently by the row count and the row's place in it, but alike
# in every whole block of 4 rows (measured on x86-64, fp32 and bf16, up to 32 rows), so a
# request decodes the same alone and in any batch. Not 1 in bf16 either: the model rounds a
# one-token row alike at 1 to 13 rows (not 14 and more), yet whole greedy decodes batched 8 at
# a time differ from the solo ones for 2 requests of 8 (2026-12-01).
ROW_BLOCK = 4
# In bf16, prompts admitted together are prefilled in packs (one forward pass, the prompts one
# after another): a pack's rows get the logits and caches they get alone, bitwise (measured on
# x86-64 with AVX512-BF16, packs of 2 to 8 prompts of 1 to 150 tokens), as long as the LM head,
# which scores one token per prompt, keeps to at most PACK_ROWS rows (alike at 1 to 13 rows, see
# ROW_BLOCK); PACK_TOKENS bounds the activations. In fp32 the matrix kernels round a prompt's
# tokens differently in a longer sequence (logits 4e-5 apart): each prompt is prefilled alone.
PACK_ROWS, PACK_TOKENS = 8, 4096
# Those guarantees hold for oneDNN's AVX512-BF16 kernels. Its AMX kernels (x86 CPUs with AMX)
# round a bf16 row differently by how many rows share the product (greedy decodes of 8
# requests batched differed from their solo ones, 2026-12-03), so a serving process keeps
# oneDNN to AVX512-BF16 (`cap_onednn_isa`; oneDNN reads the variable once, at its first use).
# The training worker is not capped: `training_env`.
ONEDNN_ISA = ("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
_capped = False
SPAN = 16  # decoding attention runs over a multiple of this many positions (see KvPool)
PRECISIONS = ("auto", "bf16", "fp32")


def cap_onednn_isa() -> None:
    """Keep this process's oneDNN off AMX (see ONEDNN_ISA) unless the operator chose an ISA;
    in effect only before oneDNN's first use in the process."""
    global _capped
    if ONEDNN_ISA[0] not in os.environ:
        os.environ[ONEDNN_ISA[0]] = ONEDNN_ISA[1]
        _capped = True


def training_env() -> dict[str, str]:
    """The environment for the training worker: this process's, without the serving cap."""
    env = dict(os.environ)
    if _capped:
        env.pop(ONEDNN_ISA[0], None)
    return env


def native_bf16() -> bool:
    """Whether this machine computes bf16 natively: precision "auto" for serving and training
    (`feedback.job.trains_in_bf16`): a CUDA GPU that supports it; oneDNN's check for
    AVX512-BF16 or AMX."""
    import torch

    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    native = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(torch.backends.mkldnn.is_available() and native is not None and native())


def serving_dtype(precision: str) -> Any:
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    bf16 = precision == "bf16" or (precision == "auto" and native_bf16())
    return torch.bfloat16 if bf16 else torch.float32


Sink = Callable[[Any], None]  # receives token ids' text (str), then Finished or an exception


@dataclass(eq=False)
class Row:
    """One request inside the engine (a row of the batch). `sink` is called on the engine thread."""

    prompt: list[int]
    max_tokens: int
    adapter: str | None
    temperature: float
    seed: int | None
    sink: Sink
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    length: int = 0  # tokens in the KV cache
    keys: Any = None  # [layers, kv_heads, capacity, head_dim]
    values: Any = None
    generator: Any = None
    _text: Any = None

    @property
    def capacity(self) -> int:
        return len(self.prompt) + self.max_tokens


class KvPool:
    """The decoding rows' caches in one tensor per keys and values: [layers, slots, kv_heads,
    length, head_dim], fp32, zeroed at allocation (a masked position must hold a finite value:
    its weight is exactly 0). Slot i holds `rows[i]`'s tokens from position 0; `begin` readies
    one decoding step (where each row writes its new token, which positions it sees)."""

    def __init__(self, rows: list[Row], shape: tuple[int, int, int, int, int]) -> None:
        import torch

        self.keys, self.values = torch.zeros(shape), torch.zeros(shape)
        self.rows = list(rows)
        self.index: Any = None  # [rows]: the slots; [rows]: where each writes its new token
        self.positions: Any = None
        self.mask: Any = None  # [rows, 1, 1, span]: 0 where a row attends, -inf elsewhere
        self.span = 0

    @property
    def slots(self) -> int:
        return int(self.keys.shape[1])

    @property
    def length(self) -> int:
        return int(self.keys.shape[3])

    def begin(self, drafts: Sequence[tuple[int, int]] = ()) -> None:
        """`drafts`: (slot, position) of draft rows after the pool's rows (see `_drafts`): each
        writes into its owner's slot at its position and attends up to it."""
        import torch

        lengths = torch.tensor([s.length for s in self.rows] + [p for _, p in drafts])
        self.span = min(self.length, -(-(int(lengths.max()) + 1) // SPAN) * SPAN)
        self.index = torch.tensor([*range(len(self.rows)), *(slot for slot, _ in drafts)])
        self.positions = lengths
        seen = torch.arange(self.span).unsqueeze(0) <= lengths.unsqueeze(1)
        self.mask = torch.zeros(seen.shape).masked_fill_(~seen, float("-inf"))[:, None, None, :]


def _rows_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                    dropout: float = 0.0, scaling: float | None = None,
                    kv_pool: KvPool | None = None, kv_rows: list[Row] | None = None,
                    **_: Any) -> tuple[Any, None]:
    """Attention over the engine's caches. Prefilling (`kv_rows`: the rows' whole prompts packed
    one after another in a single sequence): each prompt causal over its own cache, computed as
    it is alone. Decoding (`kv_pool`: one new token a row): every row's new keys and values
    written into its pool slot, then one masked attention over the pool for all rows, computed
    the same way whatever the batch (see KvPool and SPAN)."""
    import torch
    from torch.nn.functional import scaled_dot_product_attention

    layer = module.layer_idx
    if kv_rows is not None:  # prefill: each prompt into its row's own cache
        outs, start = [], 0
        for row in kv_rows:
            end = len(row.prompt)
            row.keys[layer, :, :end] = key[0, :, start:start + end]
            row.values[layer, :, :end] = value[0, :, start:start + end]
            out = scaled_dot_product_attention(
                query[:, :, start:start + end].float(), row.keys[layer, :, :end].unsqueeze(0),
                row.values[layer, :, :end].unsqueeze(0), is_causal=end > 1, scale=scaling,
                enable_gqa=True)
            outs.append(out.to(query.dtype).transpose(1, 2))
            start += end
        return torch.cat(outs, dim=1).contiguous(), None
    if kv_pool is None:
        raise RuntimeError(f"the {ATTENTION!r} attention needs the engine's caches")
    rows, span = len(kv_pool.index), kv_pool.span
    keys, values = kv_pool.keys[layer], kv_pool.values[layer]
    keys[kv_pool.index, :, kv_pool.positions] = key[:rows, :, 0].float()
    values[kv_pool.index, :, kv_pool.positions] = value[:rows, :, 0].float()
    if rows > len(kv_pool.rows):  # draft rows read their owners' slots
        keys, values = keys[kv_pool.index, :, :span], values[kv_pool.index, :, :span]
    heads, kv_heads, dim = query.shape[1], keys.shape[1], query.shape[3]
    scale = dim ** -0.5 if scaling is None else scaling
    # [rows, kv_heads, heads sharing a kv head, dim]; the cache is fp32 (CPU attention in bf16 is
    # several times slower)
    q = (query[:rows, :, 0].float() * scale).view(rows, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(q, keys[:rows, :, :span].transpose(-1, -2)) + kv_pool.mask
    out = torch.matmul(torch.softmax(scores, dim=-1), values[:rows, :, :span])
    out = out.view(rows, 1, heads, dim).to(query.dtype)  # [rows, new token, heads, dim]
    padding = query.shape[0] - rows  # padding rows attend to nothing
    if padding:
        out = torch.cat([out, out.new_zeros((padding, *out.shape[1:]))])
    return out, None


class Routing:
    """Which adapter each row of the next forward pass uses, shared by a model's LoRA layers:
    set by the engine before each pass instead of peft's `adapter_names` (which walks every
    module and hooks every LoRA layer on each call: 40% of a decoding step with two adapters
    loaded). `names` None: peft's own forward (the active adapter for every row)."""

    def __init__(self) -> None:
        self._names: list[str] | None = None
        self.base_only = False  # every row on the base model: the base layers alone
        self._masks: dict[Any, Any] = {}  # this pass's row masks, by the layers' adapter stacks
        self.generation = 0  # bumped when adapters are loaded or unloaded: stacks are rebuilt
        self._cast: tuple[Any, Any] = (None, None)  # the last layer input and its adapters' copy

    @property
    def names(self) -> list[str] | None:
        return self._names

    @names.setter
    def names(self, names: list[str] | None) -> None:
        self._names, self._masks, self._cast = names, {}, (None, None)
        self.base_only = names is not None and all(n == BASE for n in names)

    def cast(self, x: Any, dtype: Any) -> Any:
        """`x` in the adapters' precision; the q, k and v (gate and up) projections share an
        input: cast once."""
        if self._cast[0] is not x:
            self._cast = (x, x.to(dtype))
        return self._cast[1]

    def mask(self, stack: _Stack) -> Any:
        """[rows, stacked ranks]: each row's adapter's LoRA scaling at that adapter's ranks, 0
        elsewhere (None: no row uses an adapter of this stack). Once per pass and stack."""
        import torch

        names = self._names or []
        layout = tuple(stack.ranks.items())  # alike in every layer an adapter set targets
        if layout not in self._masks:
            mask = None
            if any(n in stack.ranks for n in names):
                mask = torch.zeros(len(names), stack.width, dtype=stack.a.dtype)
                for i, name in enumerate(names):
                    if name in stack.ranks:
                        lo, hi, scale = stack.ranks[name]
                        mask[i, lo:hi] = scale
            self._masks[layout] = mask
        return self._masks[layout]


@dataclass(frozen=True, slots=True)
class _Stack:
    """A LoRA layer's adapters side by side, in their own precision (fp32 as peft loads them:
    on the CPU, products this small are several times slower in bf16): `a` [ranks, in], `b`
    [out, ranks], each adapter's rank range and scaling in `ranks`; built for one
    `Routing.generation`."""

    generation: int
    a: Any
    b: Any
    ranks: dict[str, tuple[int, int, float]]
    variants: frozenset[str]  # adapters peft computes its own way (DoRA and co)

    @property
    def width(self) -> int:
        return int(self.a.shape[0])


def _stack(layer: Any, generation: int) -> _Stack | None:
    """The layer's adapters stacked (None: it has none)."""
    import torch

    stack = layer.__dict__.get("_chatloop_stack")
    if stack is not None and stack.generation == generation:
        return stack
    names = list(layer.lora_A)
    if not names:
        return None
    ranks, lo = {}, 0
    for name in names:
        hi = lo + layer.lora_A[name].weight.shape[0]
        ranks[name] = (lo, hi, float(layer.scaling[name]))
        lo = hi
    stack = _Stack(generation, torch.cat([layer.lora_A[n].weight for n in names]),
                   torch.cat([layer.lora_B[n].weight for n in names], dim=1), ranks,
                   frozenset(n for n in names if n in layer.lora_variant))
    layer.__dict__["_chatloop_stack"] = stack
    return stack


def _routed_forward(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    """A LoRA layer's forward under `Routing` (see batch_invariant_lora)."""
    routing = self._chatloop_routing
    if routing.names is None:
        return type(self).forward(self, x, *args, **kwargs)
    if routing.base_only:
        return self.base_layer(x, *args, **kwargs)
    return _lora_rows(self, x, *args, adapter_names=routing.names, **kwargs)


def _lora_rows(self: Any, x: Any, *args: Any, adapter_names: list[str], **kwargs: Any) -> Any:
    """peft's per-row adapters in two products for all of them: the input times every
    adapter's A side by side, each row's own adapter's ranks kept (scaled) and the others
    zeroed, times every B side by side. The products have the batch's row count whatever the
    mix, and the zeroed ranks add exact zeros, so a row's result does not depend on its
    neighbours' adapters (see ROW_BLOCK). Serving only: no LoRA dropout (eval mode)."""
    routing = self._chatloop_routing
    stack = _stack(self, routing.generation)
    if stack is not None and stack.variants.intersection(adapter_names):  # peft's own way
        return type(self)._mixed_batch_forward(self, x, *args, adapter_names=adapter_names,
                                               **kwargs)
    kwargs.pop("alora_offsets", None)
    result = self.base_layer(x, *args, **kwargs)
    mask = None if stack is None else routing.mask(stack)
    if mask is None:
        return result
    ranks = routing.cast(x, stack.a.dtype) @ stack.a.T  # [rows, tokens, stacked ranks]
    # summed in fp32 and rounded once, as peft does
    return result.add_(ranks.mul_(mask[:, None, :]) @ stack.b.T)


def batch_invariant_lora(model: Any) -> Routing:
    """Route a peft model's LoRA linear layers through `_lora_rows` (this model only), by the
    rows' adapters set on the returned `Routing` (the same one each call for a model)."""
    import types

    from peft.tuners.lora import Linear

    routing = model.__dict__.get("_chatloop_routing") or Routing()
    routing.generation += 1  # the adapters changed: every layer stacks its own again
    model.__dict__["_chatloop_routing"] = routing
    for module in model.modules():
        if isinstance(module, Linear):
            module.__dict__["_chatloop_routing"] = routing
            module.forward = types.MethodType(_routed_forward, module)
    return routing


def pack_weights(model: Any, rows: int = 32) -> int:
    """Reorder every linear layer's weight once, at load, into oneDNN's blocked layout for
    products of a few rows (`mkldnn._reorder_linear_weight`, the weight prepacking inductor's
    CPU backend does); decoding steps (one token a row) and the LM head then use it
    (`_packed_linear`), prefill keeps the plain weight. Measured on x86-64 with AVX512-BF16
    (a 576 -> 1536 product of 1 to 32 rows, one thread, weights not in cache): 1.5-1.8 times as
    fast as torch's bf16 product and 1.8-2.4 times MKL's fp32 one, and a row's result the same
    bitwise in every whole block of rows (docs/benchmarks.md#embedded-engine). That last
    property is checked here for each of the model's weight shapes, up to `rows` rows (and 1 to
    PACK_ROWS rows for the LM head, see `_packed_linear`): where the CPU's kernels do not keep it,
    nothing is packed. bf16 is packed only where the CPU computes it natively. Not for LoRA's
    products (rank-wide: each call's ~10 us setup outweighs them). The cost: a second copy of
    the linear weights. Returns how many layers were packed."""
    import types

    import torch

    if not torch.backends.mkldnn.is_available():
        return 0
    dtypes = (torch.float32, torch.bfloat16) if native_bf16() else (torch.float32,)
    head = model.get_output_embeddings()
    layers = [m for m in model.modules()
              if type(m) is torch.nn.Linear and m.weight.dtype in dtypes]
    blocks = range(ROW_BLOCK, -(-rows // ROW_BLOCK) * ROW_BLOCK + 1, ROW_BLOCK)
    checked: set[tuple[Any, ...]] = set()
    try:
        packed = [torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), ROW_BLOCK)
                  for m in layers]
        for module, weight in zip(layers, packed, strict=True):
            shape = (tuple(module.weight.shape), module.weight.dtype, module.bias is None,
                     module is head)
            if shape not in checked:
                counts = sorted({*blocks, *range(1, PACK_ROWS + 1)}) if module is head else blocks
                if not _alike_in_any_batch(weight, module, counts):
                    return 0
                checked.add(shape)
    except (AttributeError, RuntimeError, TypeError):  # a torch or oneDNN without these ops
        return 0
    for module, weight in zip(layers, packed, strict=True):
        module.__dict__["_chatloop_packed"] = weight
        module.__dict__["_chatloop_head"] = module is head
        module.forward = types.MethodType(_packed_linear, module)
    return len(layers)


def _alike_in_any_batch(weight: Any, layer: Any, counts: Sequence[int]) -> bool:
    """Whether the packed product gives each row the same bits for every row count."""
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(max(counts), 1, layer.in_features, generator=g).to(layer.weight.dtype)
    with torch.inference_mode():
        full = _packed_product(x, weight, layer.bias)
        return all(torch.equal(_packed_product(x[:n], weight, layer.bias), full[:n])
                   for n in counts)


def _packed_product(x: Any, weight: Any, bias: Any) -> Any:
    """`x` times a weight packed by `pack_weights` (plus `bias`): oneDNN's linear, no fused op."""
    import torch

    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _packed_linear(self: Any, x: Any) -> Any:
    """A packed layer's forward: the packed weight for one token a row (decoding) and for the
    LM head, whose rows are the scored tokens alone or packed (see PACK_ROWS: a prompt's logits
    must not depend on the kernel its pack picks); the plain weight for prompts (prefill, where
    the blocked kernels were slower)."""
    import torch

    if x.shape[-2] != 1 and not self._chatloop_head:
        return torch.nn.functional.linear(x, self.weight, self.bias)
    return _packed_product(x, self._chatloop_packed, self.bias)


def register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, _rows_attention)


class BatchEngine:
    """The decoding loop on its own thread. `model` is a causal LM (or a peft model around one)
    whose config uses the `ATTENTION` implementation; `submit` queues a request, `call` runs a
    function on the loop's thread between two steps (loading and unloading adapters)."""

    def __init__(self, model: Any, tokenizer: Any, *, eos_ids: set[int], max_batch: int,
                 max_kv_tokens: int, decode_threads: int | None = 1,
                 drafts: bool = True) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_kv_tokens = max_kv_tokens
        # intra-op threads of a decoding step (None: torch's, as prefill has). A step is ~200
        # small products; each one split over threads waits to wake them (futexes once the
        # process has more OpenMP threads than cores, as with the gateway's own torch use): on
        # 2 cores one thread decodes 1, 8 and 32 rows faster, the event loop keeping the other
        # core (docs/benchmarks.md#embedded-engine)
        self.decode_threads = decode_threads
        self._threads: tuple[int, int] = (0, 0)  # torch's count on this thread; the current
        self.eos_ids = eos_ids  # tokens that end a row (empty: run to max_tokens)
        # greedy rows fill a step's padding rows with draft tokens (see `_drafts`)
        self.drafts = drafts
        self.drafted = 0  # draft tokens decoded and accepted since start (benchmarks, tests)
        self.accepted = 0
        self._adapters: set[str] = set()  # names peft serves; rows for others fail
        self._cond = threading.Condition()
        self._waiting: deque[Row] = deque()
        self._calls: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._active: list[Row] = []
        self._reserved = 0  # KV tokens reserved by the active rows
        self._stopping = False
        self.steps = 0  # decoding steps and prefill passes run; the peaks since start (tests
        self.prefills = 0  # and benchmarks)
        self.peak_rows = 0
        self.peak_kv_tokens = 0
        self._pool: KvPool | None = None  # the decoding rows' caches (None: no row decoding)
        self._thread = threading.Thread(target=self._run, name="embedded-batch", daemon=True)
        self._thread.start()

    # -- the caller's side (any thread) --------------------------------------------------------

    def submit(self, seq: Row) -> None:
        if seq.capacity > self.max_kv_tokens:
            raise ContextTooLong(f"{len(seq.prompt)} prompt tokens + {seq.max_tokens} exceed "
                                 f"the KV cache cap ({self.max_kv_tokens})")
        with self._cond:
            if self._stopping:
                raise InferenceError("the embedded engine is closed")
            self._waiting.append(seq)
            self._cond.notify()

    def wake(self) -> None:
        """Let the loop notice a cancellation now (it checks between steps anyway)."""
        with self._cond:
            self._cond.notify()

    def call(self, fn: Callable[[], Any]) -> Future[Any]:
        future: Future[Any] = Future()
        with self._cond:
            if self._stopping:
                raise InferenceError("the embedded engine is closed")
            self._calls.append((fn, future))
            self._cond.notify()
        return future

    def active_rows(self) -> int:
        return len(self._active)

    def set_adapters(self, names: set[str]) -> None:
        """On the loop's thread only (inside `call`): the adapters rows may use."""
        self._adapters = set(names)

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=30)

    # -- the loop's thread ---------------------------------------------------------------------

    def _run(self) -> None:
        import torch

        self._threads = (torch.get_num_threads(),) * 2  # per thread: omp_set_num_threads
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not (self._stopping or self._calls or self._active
                               or self._admissible()):
                        self._cond.wait(timeout=0.5 if self._waiting else None)
                    if self._stopping:
                        break
                    calls, self._calls = list(self._calls), deque()
                for fn, future in calls:
                    self._run_call(fn, future)
                try:
                    self._drop_cancelled()
                    self._prefill(self._admit())
                    if self._active:
                        self._decode()
                except Exception as exc:  # a bug must not stop the loop: fail the rows
                    error = InferenceError(f"generation failed: {type(exc).__name__}: {exc}")
                    for seq in list(self._active):
                        self._leave(seq, error)
        self._fail_all(InferenceError("the embedded engine is closed"))

    def _run_call(self, fn: Callable[[], Any], future: Future[Any]) -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:  # handed to the caller
            future.set_exception(exc)

    def _admissible(self, admitted: tuple[Row, ...] = ()) -> bool:
        """Whether the next waiting request fits beside the active rows and `admitted`: its
        reserved tokens, and the pooled cache they would all decode in (a lone row always)."""
        self._waiting = deque(s for s in self._waiting if not s.cancelled.is_set())
        if not self._waiting:
            return False
        rows = [*self._active, *admitted, self._waiting[0]]
        if len(rows) > self.max_batch:
            return False
        if self._reserved + rows[-1].capacity > self.max_kv_tokens:
            return False
        return len(rows) == 1 or len(rows) * _spans(max(s.capacity for s in rows)) <= (
            self.max_kv_tokens)

    def _admit(self) -> list[Row]:
        admitted: list[Row] = []
        with self._cond:
            while self._admissible(tuple(admitted)):
                seq = self._waiting.popleft()
                self._reserved += seq.capacity
                self.peak_kv_tokens = max(self.peak_kv_tokens, self._reserved)
                admitted.append(seq)
        return admitted

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self._active if s.cancelled.is_set()]:
            self._leave(seq)

    def _leave(self, seq: Row, event: Any = None) -> None:
        self._active.remove(seq)
        self._reserved -= seq.capacity
        seq.keys = seq.values = None
        if self._pool is not None and not self._active:
            self._pool = None
        if event is not None:
            seq.sink(event)

    def _fail_all(self, exc: InferenceError) -> None:
        for seq in list(self._active):
            self._leave(seq, exc)
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        for seq in waiting:
            seq.sink(exc)

    def _forward(self, rows: list[Row], ids: Any, positions: Any, keep: Any = None,
                 **caches: Any) -> Any:
        """One forward pass, the logits of each row's last token. Decoding: a row of `ids` per
        row (padding rows after them: base model, dropped). Prefilling: one packed row of the
        rows' prompts (one adapter), `keep` the position of each prompt's last token."""
        routing = self.model.__dict__.get("_chatloop_routing")  # set once adapters are loaded
        if self._adapters:
            names = [s.adapter or BASE for s in rows][:ids.shape[0]]
            routing.names = names + [BASE] * (ids.shape[0] - len(names))
        try:
            out = self.model(input_ids=ids, position_ids=positions, use_cache=False,
                             logits_to_keep=1 if keep is None else keep, **caches)
        finally:
            if routing is not None:
                routing.names = None
        if keep is not None:
            return out.logits[0].float()
        return out.logits[:len(rows), -1, :].float()

    def _use_threads(self, count: int | None) -> None:
        import torch

        default, current = self._threads
        count = count or default
        if count != current:
            torch.set_num_threads(count)  # this thread's OpenMP and MKL count only
            self._threads = (default, count)

    def _pooled(self, rows: list[Row]) -> KvPool:
        """The pool holding exactly `rows`, in order: the current one, compacted in place when
        rows left, or a new one (rows joined or need longer slots) with every row copied in."""
        pool = self._pool
        length = _spans(max(s.capacity for s in rows))
        if pool is not None and pool.rows == rows:
            return pool
        kept = set(map(id, pool.rows)) if pool is not None else set()
        if pool is not None and all(id(s) in kept for s in rows) and pool.length >= length:
            slots = {id(s): i for i, s in enumerate(pool.rows)}
            for i, seq in enumerate(rows):  # rows keep their order: slot i <= the old slot
                old = slots[id(seq)]
                if old != i:
                    pool.keys[:, i, :, :seq.length] = pool.keys[:, old, :, :seq.length]
                    pool.values[:, i, :, :seq.length] = pool.values[:, old, :, :seq.length]
            pool.rows = list(rows)
        else:
            layers, kv_heads, _, head_dim = rows[0].keys.shape
            self._pool = None  # the old pool goes once its rows are copied out
            pool = KvPool(rows, (layers, len(rows), kv_heads, length, head_dim))
            for i, seq in enumerate(rows):
                pool.keys[:, i, :, :seq.length] = seq.keys[:, :, :seq.length]
                pool.values[:, i, :, :seq.length] = seq.values[:, :, :seq.length]
        for i, seq in enumerate(rows):  # each row's cache is now its slot
            seq.keys, seq.values = pool.keys[:, i], pool.values[:, i]
        self._pool = pool
        return pool

    def _prefill(self, admitted: list[Row]) -> None:
        """Prefill the admitted rows: those on the same adapter packed into one forward pass
        (`_packs`), each prompt attending to itself alone (`_rows_attention`), then each row's
        first token. A pack's failure fails its own rows."""
        import torch

        cfg = self.model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        ready = []
        for seq in admitted:
            if seq.adapter is not None and seq.adapter not in self._adapters:
                self._reserved -= seq.capacity
                seq.sink(AdapterNotFound(f"adapter {seq.adapter!r} is not loaded"))
                continue
            shape = (cfg.num_hidden_layers, cfg.num_key_value_heads, seq.capacity, head_dim)
            seq.keys, seq.values = torch.empty(shape), torch.empty(shape)  # fp32: _rows_attention
            if seq.temperature > 0:
                seq.generator = torch.Generator()
                if seq.seed is not None:
                    seq.generator.manual_seed(seq.seed)
                else:
                    seq.generator.seed()
            self._active.append(seq)
            ready.append(seq)
        self._use_threads(None)
        for pack in _packs(ready, self.model.dtype == torch.bfloat16):
            ids = torch.tensor([[t for s in pack for t in s.prompt]])
            positions = torch.cat([torch.arange(len(s.prompt)) for s in pack]).unsqueeze(0)
            last = torch.tensor([len(s.prompt) for s in pack]).cumsum(0) - 1
            try:
                logits = self._forward(pack, ids, positions, keep=last, kv_rows=pack)
            except Exception as exc:  # torch / transformers failures become typed errors
                error = InferenceError(f"generation failed: {type(exc).__name__}: {exc}")
                for seq in pack:
                    self._leave(seq, error)
                continue
            self.prefills += 1
            for seq in pack:
                seq.length = len(seq.prompt)
            self._advance(pack, logits)

    def _decode(self) -> None:
        import torch

        rows = list(self._active)
        self.peak_rows = max(self.peak_rows, len(rows))
        drafts = self._drafts(rows)
        batch = rows + [rows[i] for i, _ in drafts]
        padding = -len(batch) % ROW_BLOCK  # rows computed and dropped: the first row again
        ids = torch.tensor([[s.tokens[-1]] for s in rows] + [[t] for _, t in drafts]
                           + [[rows[0].tokens[-1]]] * padding)
        at = [s.length for s in rows]
        draft_at = []  # each draft's position: right after its owner's previous one
        for i, _ in drafts:
            at[i] += 1
            draft_at.append(at[i])
        positions = torch.tensor([[s.length] for s in rows] + [[p] for p in draft_at]
                                 + [[rows[0].length]] * padding)
        self._use_threads(self.decode_threads)
        try:
            pool = self._pooled(rows)
            pool.begin([(i, p) for (i, _), p in zip(drafts, draft_at, strict=True)])
            logits = self._forward(batch, ids, positions, kv_pool=pool)
        except Exception as exc:
            error = InferenceError(f"generation failed: {type(exc).__name__}: {exc}")
            for seq in rows:
                self._leave(seq, error)
            return
        self.steps += 1
        self.drafted += len(drafts)
        for seq in rows:
            seq.length += 1
        self._advance(rows, logits, drafts)

    def _drafts(self, rows: list[Row]) -> list[tuple[int, int]]:
        """(row index, token) of the draft tokens this step decodes in its padding rows, which
        it computes anyway (see ROW_BLOCK): a greedy row's next tokens guessed by prompt lookup
        (`_lookup`: what followed the latest earlier occurrence of the row's last tokens). A
        draft row is decoded like one more token of its owner (its slot, the next position),
        so its logits are the ones the owner gets decoding that token itself: a row keeps the
        drafts its own next tokens confirm (`_advance`), and its greedy output is the same with
        or without them, in fewer steps."""
        free = -len(rows) % ROW_BLOCK
        if not (self.drafts and free):
            return []
        drafts: list[tuple[int, int]] = []
        for i, seq in enumerate(rows):
            room = min(free - len(drafts), seq.max_tokens - len(seq.tokens) - 1)
            if seq.temperature > 0 or room <= 0 or seq.cancelled.is_set():
                continue
            drafts += [(i, t) for t in _lookup(seq.prompt + seq.tokens, room)]
            if len(drafts) == free:
                break
        return drafts

    def _advance(self, rows: list[Row], logits: Any,
                 drafts: Sequence[tuple[int, int]] = ()) -> None:
        """Pick each row's next token, stream its text, and let finished rows leave. `logits`
        has a row per row, then one per draft (`_drafts`): a row also takes the token after
        each draft that matches the token it just took, as long as they match."""
        import torch

        greedy = logits.argmax(dim=-1).tolist()
        after: dict[int, list[tuple[int, int]]] = {}  # row -> (draft token, logits row)
        for j, (i, token) in enumerate(drafts, start=len(rows)):
            after.setdefault(i, []).append((token, j))
        for i, seq in enumerate(rows):
            token = greedy[i]
            if seq.temperature > 0:
                probs = torch.softmax(logits[i] / seq.temperature, dim=-1)
                token = int(torch.multinomial(probs, 1, generator=seq.generator))
            if seq.cancelled.is_set():
                self._leave(seq)
                continue
            picks = [token]
            for draft, j in after.get(i, ()):
                if draft != picks[-1]:
                    break
                picks.append(greedy[j])
            seq.length += len(picks) - 1  # the accepted drafts' keys and values stay cached
            self.accepted += len(picks) - 1
            for token in picks:
                if self._take(seq, token):
                    break

    def _take(self, seq: Row, token: int) -> bool:
        """Stream a row's next token; let it leave when it is done (returns whether)."""
        seq.tokens.append(token)
        if seq._text is None:
            seq._text = _Detokenizer(self.tokenizer)
        stopped = token in self.eos_ids
        if not stopped:
            delta = seq._text.add(token)
            if delta:
                seq.sink(delta)
        if stopped or len(seq.tokens) >= seq.max_tokens:
            tail = seq._text.flush()
            if tail:
                seq.sink(tail)
            reason = "stop" if stopped else "length"
            self._leave(seq, Finished(reason, len(seq.prompt), len(seq.tokens)))
            return True
        return False

    def unload_rows(self, name: str) -> None:
        """On the loop's thread: fail the rows (active or waiting) that use adapter `name`."""
        error = AdapterNotFound(f"adapter {name!r} was unloaded")
        for seq in [s for s in self._active if s.adapter == name]:
            self._leave(seq, error)
        with self._cond:
            gone = [s for s in self._waiting if s.adapter == name]
            self._waiting = deque(s for s in self._waiting if s.adapter != name)
        for seq in gone:
            seq.sink(error)


def _packs(rows: list[Row], pack: bool) -> list[list[Row]]:
    """The rows to prefill, in packs of one adapter each (`pack` False: each alone): at most
    `PACK_ROWS` prompts and `PACK_TOKENS` tokens (a longer prompt alone)."""
    packs: list[list[Row]] = []
    open_: dict[str | None, list[Row]] = {}
    for seq in rows:
        current = open_.get(seq.adapter) if pack else None
        if (current is None or len(current) >= PACK_ROWS
                or sum(len(s.prompt) for s in current) + len(seq.prompt) > PACK_TOKENS):
            open_[seq.adapter] = current = []
            packs.append(current)
        current.append(seq)
    return packs


def _lookup(tokens: list[int], count: int, longest: int = 3) -> list[int]:
    """Up to `count` tokens guessed to come next (prompt lookup decoding): those that followed
    the latest earlier occurrence of the last `longest` tokens, or fewer."""
    for n in range(min(longest, len(tokens) - 1), 0, -1):
        tail = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == tail:
                return tokens[start + n:start + n + count]
    return []


def _spans(tokens: int) -> int:
    """`tokens` rounded up to whole SPANs: a pool slot's length."""
    return -(-tokens // SPAN) * SPAN


class _Detokenizer:
    """Text deltas from a growing token list (whole characters only; special tokens skipped)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._tokens: list[int] = []
        self._sent = 0

    def add(self, token: int) -> str:
        self._tokens.append(token)
        text = self._tokenizer.decode(self._tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return ""
        return self._take(text)

    def flush(self) -> str:
        return self._take(self._tokenizer.decode(self._tokens, skip_special_tokens=True))

    def _take(self, text: str) -> str:
        if len(text) <= self._sent:
            return ""
        delta, self._sent = text[self._sent:], len(text)
        return delta

