"""A training run's loss curves, read from what the trainer wrote in its run directory.

The trainer (feedback/train.py) logs every step to TensorBoard event files under
`<run dir>/tensorboard` (one file per stage: SFT, then KTO if it ran) and prints each step's
log dict to `train.log`; the curves come from the event files, else from the log.
"""

from __future__ import annotations

import ast
from pathlib import Path

Curve = list[tuple[int, float]]  # (step, loss)


def loss_curves(log_path: str | None) -> dict[str, Curve]:
    """Stage name -> its training loss per step ({} when nothing was written)."""
    if not log_path:
        return {}
    work = Path(log_path).parent
    try:
        curves = _from_events(work / "tensorboard")
    except Exception:  # an unreadable or foreign file: fall back to the log
        curves = {}
    return curves or _from_log(Path(log_path))


def _from_events(folder: Path) -> dict[str, Curve]:
    files = sorted(folder.rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    if not files:
        return {}
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    out: dict[str, Curve] = {}
    for i, path in enumerate(files):
        points: Curve = []
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag not in ("train/loss", "loss"):
                    continue
                if value.HasField("tensor"):
                    v = float(tensor_util.make_ndarray(value.tensor))
                else:
                    v = float(value.simple_value)
                points.append((int(event.step), v))
        if points:
            out[_stage(i, len(out))] = sorted(points)
    return out


def _from_log(path: Path) -> dict[str, Curve]:
    """The `{'loss': ..., 'epoch': ...}` lines; a `train_runtime` line ends a stage."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return {}
    out: dict[str, Curve] = {}
    points: Curve = []
    for raw in text.splitlines():
        line = raw.strip()
        start = line.find("{'")
        if start < 0 or not line.endswith("}"):
            continue
        try:
            logged = ast.literal_eval(line[start:])
        except (ValueError, SyntaxError):
            continue
        if not isinstance(logged, dict):
            continue
        if "loss" in logged:
            try:
                points.append((len(points) + 1, float(logged["loss"])))
            except (TypeError, ValueError):
                continue
        elif "train_runtime" in logged and points:
            out[_stage(len(out), len(out))] = points
            points = []
    if points:
        out[_stage(len(out), len(out))] = points
    return out


def _stage(_: int, n: int) -> str:
    return ("sft", "kto")[n] if n < 2 else f"stage {n + 1}"
