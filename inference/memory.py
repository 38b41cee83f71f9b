"""The answer memory's search structure: hybrid lexical (bm25s) + dense (an embedder) retrieval.

In-process and incremental: a new or changed entry is searchable at once, a removed one is
masked, and nothing is rebuilt per request. Dense vectors live in one growing matrix (an
entry's vector is the mean of its question's and its answer's unit vectors, so one product
scores both; capacity doubles, so an append is amortised cheap). The lexical side is a few
bm25s segments, as in Lucene: new entries go into a small fresh segment (rebuilt on each
write, at most `fresh_limit` entries); a full fresh segment is sealed, and sealed segments
of similar size merge, so there are O(log n) of them and each entry is re-indexed O(log n)
times in all (the caller runs `upsert` in a worker thread: searches never wait for it).

The score of an entry is `dense + lexical_weight * bm25`: dense is a cosine in [-1, 1], the
BM25 part adds the exact words (names, codes) an averaged embedding blurs. Thresholds on it
are calibrated on the synthetic company set (benchmarks/answer_memory.py).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from inference.prepare import INT8_ONNX

log = logging.getLogger(__name__)

DEFAULT_EMBEDDER = "minilm"
MINILM_DIR = Path("var/models/all-MiniLM-L6-v2")  # `chatloop model prepare` writes it
MINILM_KINDS = {"minilm": "auto", "minilm-int8": "int8", "minilm-fp32": "fp32"}  # precision
ONNX_PRECISIONS = tuple(MINILM_KINDS.values())
# Per embedder kind, the similarity from which an approved answer is sent as it is, and from
# which entries are quoted in the prompt (calibrated on the synthetic company set:
# docs/benchmarks.md#answer-memory). An embedder of another kind (hf:PATH) has no calibration
# of its own: set CHATLOOP_MEMORY_ANSWER_THRESHOLD and _REFERENCE_THRESHOLD for it.
CALIBRATED = {"minilm": (0.6, 0.45), "wordllama": (0.6, 0.45)}
ANSWER_AT, REFER_AT = CALIBRATED[DEFAULT_EMBEDDER]
_WORD = re.compile(r"\w+", re.UNICODE)


class Embedder(Protocol):
    """Texts -> unit vectors (float32, shape (n, dim)); `name` says which model made them."""

    name: str
    dim: int
    inline: bool  # cheap enough to run on the event loop

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


class OnnxEmbedder:
    """A sentence-embedding model exported to ONNX by `chatloop model prepare` (model.onnx:
    token ids and mask in, mean-pooled unit vectors out; tokenizer.json beside it), run by
    onnxruntime on one thread that never spins waiting for work (the process has a model to
    run too). all-MiniLM-L6-v2 reads 42 MB of matrices per question in fp32 (3-8 ms,
    bound by memory bandwidth); `precision` "auto" runs its int8 copy (model.int8.onnx, a
    quarter of the bytes: 2-2.5 ms) where the CPU has int8 dot-product instructions, on
    which onnxruntime's int8 kernels are fast and do not saturate; elsewhere they are no
    faster and may saturate, so fp32 runs there."""

    inline = False  # a forward pass: off the event loop (onnxruntime releases the GIL)

    def __init__(self, path: Path, precision: str = "auto") -> None:
        import onnxruntime
        from tokenizers import Tokenizer

        if precision not in ONNX_PRECISIONS:
            raise ValueError(f"embedder precision must be one of {', '.join(ONNX_PRECISIONS)}"
                             f", not {precision!r}")
        if not (path / "model.onnx").exists():
            raise FileNotFoundError(f"no sentence-embedding model at {path}: run `chatloop "
                                    "model prepare` (it prepares the memory's embedder too)")
        int8 = precision == "int8" or (precision == "auto" and int8_dot_product())
        if int8 and not (path / INT8_ONNX).exists():
            if precision == "int8":
                raise FileNotFoundError(f"no {INT8_ONNX} at {path}: run `chatloop model "
                                        "prepare` (it adds the int8 copy)")
            log.warning("no %s at %s (run `chatloop model prepare` to add it): the memory's "
                        "embedder runs in fp32", INT8_ONNX, path)
            int8 = False
        self._tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self._tokenizer.enable_truncation(256)
        self._tokenizer.enable_padding()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        model = path / (INT8_ONNX if int8 else "model.onnx")
        self._session = onnxruntime.InferenceSession(str(model), options,
                                                     providers=["CPUExecutionProvider"])
        self.dim = int(self._session.get_outputs()[0].shape[-1])
        # int8 activations are quantised with one scale per call: a text's vector would
        # depend on what it is batched (and padded) with, so the int8 copy takes one at a time
        self._batch = 1 if int8 else 64
        # vectors are cached in the database under this name: the copies' differ a little
        self.name = f"onnx/{path.name}" + ("/int8" if int8 else "")

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        for start in range(0, len(texts), self._batch):  # padded batches (int8: one text)
            encoded = self._tokenizer.encode_batch(list(texts[start:start + self._batch]))
            ids = np.asarray([e.ids for e in encoded], np.int64)
            mask = np.asarray([e.attention_mask for e in encoded], np.int64)
            out[start:start + len(encoded)] = self._session.run(None, {"ids": ids,
                                                                       "mask": mask})[0]
        return out


class WordLlamaEmbedder:
    """wordllama's static token embeddings (the weights and tokenizer ship in its wheel:
    nothing is downloaded), average-pooled; about 20 µs a question on one core."""

    inline = True  # cheaper than a trip to a worker thread

    def __init__(self, config: str = "l2_supercat", dim: int = 256) -> None:
        root = logging.getLogger()
        handlers = list(root.handlers)
        level = root.level
        try:  # wordllama calls logging.basicConfig on import: keep the app's logging as it is
            import wordllama
            from safetensors import safe_open
            from tokenizers import Tokenizer
            from wordllama.inference import WordLlamaInference
        finally:
            root.handlers[:] = handlers
            root.setLevel(level)
        pkg = Path(wordllama.__file__).parent
        # WordLlama.load looks for the tokenizer under tokenizer/ (the wheel has tokenizers/)
        # and then goes online: read the wheel's own files directly
        with safe_open(str(pkg / "weights" / f"{config}_{dim}.safetensors"),
                       framework="np") as f:
            table = f.get_tensor("embedding.weight")
        tokenizer = Tokenizer.from_file(str(pkg / "tokenizers" / f"{config}_tokenizer_config.json"))
        self._model = WordLlamaInference(table, tokenizer)
        self.name, self.dim = f"wordllama/{config}-{dim}", dim

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return np.asarray(self._model.embed(list(texts), norm=True), dtype=np.float32)


class HiddenStateEmbedder:
    """A transformers model's mean-pooled last hidden state (e.g. the served model's own, or
    any sentence-embedding model directory): the swap-in for a better embedder."""

    inline = False

    def __init__(self, path: str) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self._torch = torch
        self._tok = AutoTokenizer.from_pretrained(path)
        if self._tok.pad_token is None:
            self._tok.pad_token = self._tok.eos_token
        self._model = AutoModel.from_pretrained(path).eval()
        self.name, self.dim = f"hf/{Path(path).name}", int(self._model.config.hidden_size)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        with self._torch.inference_mode():
            batch = self._tok(list(texts), padding=True, truncation=True, max_length=256,
                              return_tensors="pt")
            hidden = self._model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            pooled = self._torch.nn.functional.normalize(pooled.float(), dim=-1)
        return pooled.numpy().astype(np.float32)


@cache
def int8_dot_product() -> bool:
    """Whether the CPU has int8 dot-product instructions (x86 VNNI or AMX, Arm's dotprod):
    where the memory's embedder runs its int8 copy (precision "auto")."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    line = re.search(r"^(?:flags|Features)\s*:(.*)$", info, re.MULTILINE)
    return bool(line and {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp"} & set(
        line.group(1).split()))


@cache  # one per process and spec: stateless, and safe to share between threads
def load_embedder(spec: str = DEFAULT_EMBEDDER) -> Embedder:
    """`minilm` (default: all-MiniLM-L6-v2 as `chatloop model prepare` writes it to
    var/models; int8 where the CPU has int8 dot products, else fp32), `minilm-int8` or
    `minilm-fp32` (one of the two wherever it runs), each with `:DIR` (prepared elsewhere),
    `wordllama` (l2_supercat, 256 dimensions, in its wheel), `wordllama:CONFIG:DIM`, or
    `hf:PATH` (a local transformers model directory: mean-pooled hidden states)."""
    kind, _, rest = spec.partition(":")
    if (prepared := embedder_dir(spec)) is not None:
        return OnnxEmbedder(prepared, MINILM_KINDS[kind])
    if kind == "wordllama":
        config, _, dim = rest.partition(":")
        return WordLlamaEmbedder(config or "l2_supercat", int(dim or 256))
    if kind == "hf" and rest:
        return HiddenStateEmbedder(rest)
    raise ValueError(f"unknown embedder {spec!r}: use minilm[:DIR] (or minilm-int8, "
                     "minilm-fp32), wordllama[:CONFIG:DIM] or hf:PATH")


def embedder_dir(spec: str) -> Path | None:
    """Where `chatloop model prepare` writes the model an embedder spec names (None: the
    spec needs nothing prepared)."""
    kind, _, rest = spec.partition(":")
    return (Path(rest) if rest else MINILM_DIR) if kind in MINILM_KINDS else None


def thresholds(spec: str, answer: float | None = None,
               reference: float | None = None) -> tuple[float, float]:
    """(answer, reference): those given, else the ones calibrated for the embedder spec's
    kind; ValueError if a kind without calibration (hf:PATH) lacks one."""
    kind = spec.partition(":")[0]
    calibrated = CALIBRATED.get("minilm" if kind in MINILM_KINDS else kind)
    answer = answer or (calibrated and calibrated[0])
    reference = reference or (calibrated and calibrated[1])
    if not answer or not reference:
        raise ValueError(
            f"CHATLOOP_MEMORY_EMBEDDER={spec} has no calibrated thresholds: set "
            "CHATLOOP_MEMORY_ANSWER_THRESHOLD and CHATLOOP_MEMORY_REFERENCE_THRESHOLD "
            "(benchmarks/answer_memory.py prints a calibration table)")
    return answer, reference


@cache
def _stemmer() -> Any:
    try:
        import Stemmer

        return Stemmer.Stemmer("english")
    except ImportError:  # PyStemmer is optional for bm25s: words are matched unstemmed
        return None


@cache
def _stopwords() -> frozenset[str]:
    from bm25s.stopwords import STOPWORDS_EN

    return frozenset(STOPWORDS_EN)


def words(text: str) -> list[str]:
    """The lexical side's tokens: lower-cased words, English stop words out, stemmed."""
    stop = _stopwords()
    kept = [w for w in _WORD.findall(text.lower()) if w not in stop]
    stemmer = _stemmer()
    return stemmer.stemWords(kept) if stemmer is not None and kept else kept


@dataclass(frozen=True, slots=True)
class Doc:
    """What the index knows of an entry."""

    id: int
    question: str
    answer: str


@dataclass(frozen=True, slots=True)
class Hit:
    id: int
    score: float
    dense: float
    lexical: float


@dataclass(frozen=True, slots=True)
class Reference:
    """An entry a turn used, with its similarity to the question."""

    id: int
    question: str
    answer: str
    score: float


@dataclass(frozen=True, slots=True)
class Recall:
    """What the memory offers a question: an answer to send as it is, or else entries to
    quote in the prompt (none: the model answers alone)."""

    verbatim: Reference | None = None
    references: tuple[Reference, ...] = ()


class _Lexical:
    """One bm25s index over some slots of the dense matrix."""

    def __init__(self, slots: np.ndarray, tokens: list[list[str]]) -> None:
        import bm25s

        self.slots = slots
        self.bm25 = bm25s.BM25()
        if len(slots):
            self.bm25.index([t or [""] for t in tokens], show_progress=False)

    def add_to(self, out: np.ndarray, query: list[str], weight: float) -> None:
        if not len(self.slots):
            return
        ids = self.bm25.get_tokens_ids(query)
        if ids:
            out[self.slots] += weight * self.bm25.get_scores_from_ids(ids)


class HybridIndex:
    """Entries by id, searchable by a question; see the module docstring."""

    def __init__(self, embedder: Embedder, *, lexical_weight: float = 0.06,
                 fresh_limit: int = 512) -> None:
        self.embedder, self.lexical_weight, self.fresh_limit = embedder, lexical_weight, fresh_limit
        self._vectors = np.zeros((64, embedder.dim), np.float32)
        self._alive = np.zeros(64, bool)
        self._ids = np.zeros(64, np.int64)
        self._tokens: list[list[str]] = []  # by slot
        self._slot: dict[int, int] = {}  # live entry id -> slot
        self.docs: dict[int, Doc] = {}  # live entries by id
        self._size = 0  # slots used
        self._sealed: tuple[_Lexical, ...] = ()  # larger (older) first
        self._fresh = _Lexical(np.zeros(0, np.int64), [])
        self._dead = 0  # slots of removed or replaced entries (masked in searches)
        self._fresh_slots: list[int] = []
        self._write = threading.Lock()  # one writer; searches read a consistent snapshot

    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, entry_id: int) -> bool:
        return entry_id in self._slot

    def vectors(self, docs: Sequence[Doc]) -> np.ndarray:
        """The dense vectors of these entries (what `upsert` stores when given none)."""
        texts = list(dict.fromkeys(t for d in docs for t in (d.question, d.answer)))
        made = dict(zip(texts, self.embedder.embed(texts), strict=True))  # answers repeat
        v = np.asarray([made[d.question] + made[d.answer] for d in docs], np.float32)
        return (v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-9)).astype(
            np.float32)

    def upsert(self, docs: Sequence[Doc], vectors: np.ndarray | None = None) -> None:
        """Add entries, or replace those with these ids."""
        if not docs:
            return
        vecs = self.vectors(docs) if vectors is None else vectors
        toks = [words(f"{d.question} {d.answer}") for d in docs]
        with self._write:
            self._remove([d.id for d in docs])
            need = self._size + len(docs)
            if need > len(self._alive):
                self._grow(max(need, 2 * len(self._alive)))
            start = self._size
            slots = np.arange(start, need)
            self._vectors[start:need] = vecs
            self._ids[start:need] = [d.id for d in docs]
            self._tokens.extend(toks)
            self._alive[start:need] = True
            self._slot.update({d.id: int(s) for d, s in zip(docs, slots, strict=True)})
            self.docs.update({d.id: d for d in docs})
            self._size = need
            self._fresh_slots.extend(int(s) for s in slots)
            fresh = np.asarray(self._fresh_slots, np.int64)
            self._fresh = _Lexical(fresh, [self._tokens[s] for s in fresh])
            if len(self._fresh_slots) >= self.fresh_limit:
                self._seal()

    def remove(self, ids: Sequence[int]) -> None:
        with self._write:
            self._remove(ids)

    def _remove(self, ids: Sequence[int]) -> None:
        for i in ids:
            slot = self._slot.pop(i, None)
            self.docs.pop(i, None)
            if slot is not None:
                self._alive[slot] = False
                self._tokens[slot] = []
                self._dead += 1

    def _grow(self, capacity: int) -> None:
        vectors = np.zeros((capacity, self.embedder.dim), np.float32)
        vectors[:self._size] = self._vectors[:self._size]
        alive, ids = np.zeros(capacity, bool), np.zeros(capacity, np.int64)
        alive[:self._size], ids[:self._size] = self._alive[:self._size], self._ids[:self._size]
        self._vectors, self._alive, self._ids = vectors, alive, ids

    def _seal(self) -> None:
        """The fresh segment joins the sealed ones; the newest two merge (dropping removed
        entries) while the newer is at least half the size of the older."""
        sealed = list(self._sealed) + [self._fresh]
        while len(sealed) >= 2 and 2 * len(sealed[-1].slots) >= len(sealed[-2].slots):
            both = np.concatenate([sealed[-2].slots, sealed[-1].slots])
            live = both[self._alive[both]]
            sealed[-2:] = [_Lexical(live, [self._tokens[s] for s in live])]
        self._sealed = tuple(sealed)
        self._fresh, self._fresh_slots = _Lexical(np.zeros(0, np.int64), []), []

    def search(self, text: str, *, k: int = 3) -> list[Hit]:
        """The `k` best live entries for a question, best first."""
        if not self._slot:
            return []
        tiers = (*self._sealed, self._fresh)  # first: their slots are all below `size`
        size, vectors, alive, ids = self._size, self._vectors, self._alive, self._ids
        query = self.embedder.embed([text])[0]
        # einsum, not `@`: numpy's BLAS splits a matrix-vector product over threads, and on
        # a busy machine waiting for them costs ten times the product itself
        dense = np.einsum("ij,j->i", vectors[:size], query)
        score = dense.copy()
        tokens = words(text)
        if tokens:
            for tier in tiers:
                tier.add_to(score, tokens, self.lexical_weight)
        lexical = score - dense
        if self._dead:
            score[~alive[:size]] = -np.inf
        k = min(k, len(self._slot))
        top = np.argpartition(-score, k - 1)[:k] if k < size else np.arange(size)
        top = top[np.argsort(-score[top])]
        return [Hit(int(ids[s]), float(score[s]), float(dense[s]), float(lexical[s]))
                for s in top[:k] if np.isfinite(score[s])]

    def recall(self, question: str, *, answer_at: float = ANSWER_AT,
               refer_at: float = REFER_AT, k: int = 3, previous: str | None = None) -> Recall:
        """Above `answer_at` the best entry is sent as it is; from `refer_at` the best `k`
        are quoted. `previous` (the conversation's last question) is tried with the question
        when the question alone matches nothing well enough to send: a follow-up."""
        hits = self.search(question, k=k)
        if previous and (not hits or hits[0].score < answer_at):
            joined = self.search(f"{previous} {question}", k=k)
            if joined and (not hits or joined[0].score > hits[0].score):
                hits = joined
        refs = tuple(Reference(h.id, d.question, d.answer, h.score) for h in hits
                     if h.score >= refer_at and (d := self.docs.get(h.id)))
        if refs and refs[0].score >= answer_at:
            return Recall(verbatim=refs[0])
        return Recall(references=refs)


def to_bytes(vector: np.ndarray) -> bytes:
    return np.asarray(vector, np.float32).tobytes()


def from_bytes(blob: bytes, dim: int) -> np.ndarray | None:
    """A stored vector, or None if it is not one of `dim` float32s."""
    v = np.frombuffer(blob, np.float32)
    return v if v.shape == (dim,) else None
