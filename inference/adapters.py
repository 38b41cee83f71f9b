"""Checks on a peft LoRA adapter directory before any backend is asked to load it."""

from __future__ import annotations

import json
from pathlib import Path

from inference.errors import AdapterRejected


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
