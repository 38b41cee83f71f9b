"""Checks on a peft LoRA adapter directory before any backend is asked to load it."""

from __future__ import annotations

import json
import re
from pathlib import Path

from inference.errors import AdapterRejected

# an adapter name prefix (CHATLOOP_LEARN_ADAPTER_PREFIX): one path segment, nothing to escape
ADAPTER_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")


def check_prefix(prefix: str) -> str:
    """`prefix` if adapter names made from it (`PREFIX-vN`) are one safe path segment."""
    if not ADAPTER_PREFIX.fullmatch(prefix):
        raise ValueError(f"adapter name prefix {prefix!r}: 1-32 of A-Z a-z 0-9 _ - "
                         "(starting with a letter or digit)")
    return prefix


def inside(path: str | Path, root: str | Path) -> Path:
    """`path` resolved (links followed, `..` applied) if it lies strictly inside `root`;
    else AdapterRejected. Adapter paths read from the database pass this before any use."""
    base = Path(root).resolve()
    resolved = (base / path).resolve()  # a relative path counts from the adapters directory
    if resolved == base or not resolved.is_relative_to(base):
        raise AdapterRejected(f"adapter path {path} is outside the adapters directory {base}")
    return resolved


def adapter_rank(path: str | Path) -> int:
    cfg_path = Path(path) / "adapter_config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except FileNotFoundError as exc:
        raise AdapterRejected(f"{cfg_path} does not exist: not a peft adapter directory") from exc
    except json.JSONDecodeError as exc:
        raise AdapterRejected(f"{cfg_path} is not valid JSON: {exc}") from exc
    rank = cfg.get("r")
    if not isinstance(rank, int) or rank <= 0:
        raise AdapterRejected(f"{cfg_path} has no valid LoRA rank `r`")
    return rank


def validate_adapter(path: str | Path, *, max_rank: int) -> int:
    """Return the adapter's rank, or raise AdapterRejected if the server could not load it."""
    rank = adapter_rank(path)
    if rank > max_rank:
        raise AdapterRejected(
            f"LoRA rank {rank} of {path} is greater than the server's max_lora_rank {max_rank}"
        )
    return rank
