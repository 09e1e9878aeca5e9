"""Checkpoints: everything an exact resume needs, as safetensors plus JSON.

Layout of one checkpoint (a directory, written under a temporary name and renamed into place,
so a crash mid-write never leaves a half checkpoint that a resume would pick up)::

    checkpoints/iter_00000100/
        model.safetensors       parameters and buffers, by module name
        optimizer.safetensors   optimizer state tensors, "state.<param index>.<key>"
        state.json              spec, iteration, optimizer param groups and scalar state,
                                torch RNG state, latest metrics
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)
_PREFIX = "iter_"


@dataclass
class Checkpoint:
    iteration: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    spec: dict[str, Any]
    rng_state: torch.Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    path: Path | None = None


def _optimizer_to_files(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for idx, entry in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(directory: Path, ckpt: Checkpoint, *, keep: int = 2) -> Path:
    """Write ``ckpt`` atomically under ``directory`` and keep only the newest ``keep``."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{_PREFIX}{ckpt.iteration:08d}"
    tmp = directory / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in ckpt.model.items()}, str(tmp / "model.safetensors"))
    opt_tensors, opt_meta = _optimizer_to_files(ckpt.optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    rng = ckpt.rng_state
    state = {
        "iteration": ckpt.iteration,
        "spec": ckpt.spec,
        "optimizer": opt_meta,
        "rng_state": base64.b64encode(rng.numpy().tobytes()).decode() if rng is not None else None,
        "metrics": ckpt.metrics,
    }
    (tmp / "state.json").write_text(json.dumps(state))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    logger.debug("checkpoint written: %s", final)
    return final


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are ignored)."""
    if not directory.is_dir():
        return []
    done = [p for p in directory.iterdir() if p.name.startswith(_PREFIX) and (p / "state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(_PREFIX):]))


def load_checkpoint(path: Path) -> Checkpoint:
    state = json.loads((path / "state.json").read_text())
    rng = state.get("rng_state")
    rng_state = torch.frombuffer(bytearray(base64.b64decode(rng)), dtype=torch.uint8) if rng else None
    return Checkpoint(
        iteration=state["iteration"],
        model=load_file(str(path / "model.safetensors")),
        optimizer=_optimizer_from_files(load_file(str(path / "optimizer.safetensors")), state["optimizer"]),
        spec=state["spec"],
        rng_state=rng_state,
        metrics=state.get("metrics", {}),
        path=path,
    )


def latest_checkpoint(directory: Path) -> Checkpoint | None:
    """The newest readable checkpoint; an unreadable one is skipped with a warning."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return load_checkpoint(path)
        except Exception as exc:  # a torn or corrupted file: fall back to the previous checkpoint
            logger.warning("skipping unreadable checkpoint %s: %s", path, exc)
    return None


def save_export(directory: Path, state: dict[str, torch.Tensor], info: dict[str, Any]) -> Path:
    """A trained model as the registry reads it: ``model.safetensors`` plus ``model.json``."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    (directory / "model.json").write_text(json.dumps(info, indent=2))
    return directory
