"""Checkpoints: everything an exact resume needs, as safetensors plus JSON.

Layout of one checkpoint (a directory; a crash mid-write never leaves a half checkpoint that a
resume would pick up)::

    checkpoints/iter_00000100/
        model.safetensors       parameters and buffers, by module name
        optimizer.safetensors   optimizer state tensors, "state.<param index>.<key>"
        state.json              spec, iteration, optimizer param groups and scalar state,
                                torch RNG state, latest metrics

The checkpoint directory is a local path, or any URI that ``pyarrow.fs`` opens (what Ray Train
accepts as a storage path): ``s3://bucket/prefix`` (options in the query string, such as
``?endpoint_override=host:port&scheme=http``; credentials from the environment, as boto3 reads
them), ``gs://``, ``hdfs://``, ``file://``. Both are one pyarrow filesystem plus a base path (a
``LocalFileSystem`` for a local path). Locally a checkpoint is written under a temporary name,
fsynced and renamed into place. Object stores cannot rename a directory, so there a checkpoint's
``state.json`` is written last and is the commit mark: a checkpoint without it is incomplete,
never read, and removed by a later save.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import torch
from safetensors.torch import load, save, save_file

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
    path: Path | str | None = None


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


Location = str | Path  # a local directory, or a URI that pyarrow.fs opens


def join(location: Location, *parts: str) -> Location:
    """``location`` / ``parts``: a path below a local directory, or below a URI's path (before its query)."""
    text = str(location)
    if "://" not in text:
        return Path(location).joinpath(*parts)
    base, sep, query = text.partition("?")
    return "/".join([base.rstrip("/"), *parts]) + sep + query


class CheckpointStorageError(RuntimeError):
    """A checkpoint location that cannot be opened (unknown scheme, bad options, missing bucket)."""


class _Store:
    """A checkpoint directory: a pyarrow filesystem and the directory's path in it.

    A plain path (or ``file://``) is a ``LocalFileSystem``; any other URI is whatever filesystem
    ``pyarrow.fs`` opens for it. Every operation goes through the filesystem; the one difference is
    how a checkpoint becomes visible (see :meth:`write`): a local directory can be renamed
    atomically, an object store cannot.
    """

    def __init__(self, location: Location) -> None:
        text = str(location)
        if "://" in text:
            try:
                self.fs, path = pafs.FileSystem.from_uri(text)
            except (pa.ArrowException, ValueError, OSError) as exc:
                raise CheckpointStorageError(f"checkpoint location {text!r}: {exc}") from exc
        else:
            self.fs, path = pafs.LocalFileSystem(), str(Path(location).absolute())
        self.root = path.rstrip("/") or "/"
        self.renames_atomically = isinstance(self.fs, pafs.LocalFileSystem)
        # What callers get back: a local checkpoint as a Path (relative if given so), others as URIs.
        self.base: Location = text
        if self.renames_atomically:
            self.base = Path(path) if "://" in text else Path(location)

    def _path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def where(self, name: str) -> Location:
        return join(self.base, name)

    def names(self) -> list[str]:
        """Every entry under the location that looks like a checkpoint, complete or not."""
        selector = pafs.FileSelector(self.root, allow_not_found=True, recursive=False)
        return [info.base_name for info in self.fs.get_file_info(selector)
                if info.type == pafs.FileType.Directory and info.base_name.startswith(_PREFIX)]

    def complete(self, name: str) -> bool:
        return self.fs.get_file_info(self._path(name, "state.json")).type == pafs.FileType.File

    def read(self, name: str, file: str) -> bytes:
        with self.fs.open_input_stream(self._path(name, file)) as stream:
            return stream.readall()

    def write(self, name: str, files: dict[str, bytes]) -> None:
        """Write one checkpoint's files so that a reader sees all of them or none.

        Local: into a staging directory, each file fsynced, then renamed into place. Object stores
        cannot rename a directory, so the files go in place with ``state.json`` last: it is the
        commit mark, and a checkpoint without it is never read (``complete``).
        """
        if self.renames_atomically:
            staging = self._path(f".tmp-{name}-{os.getpid()}")
            self._delete(staging)
            self.fs.create_dir(staging, recursive=True)
            try:
                self._write_files(staging, files)
            except BaseException:  # a full disk, say: free what was written; older checkpoints stay whole
                with contextlib.suppress(Exception):
                    self._delete(staging)
                raise
            self._delete(self._path(name))  # a rename does not replace a non-empty directory
            self.fs.move(staging, self._path(name))
            _fsync(self.root)  # the rename itself
            return
        # A complete checkpoint of this iteration (the same training state: a cancel right after a
        # periodic save) is overwritten in place, never deleted first; an incomplete one is cleared.
        if not self.complete(name):
            self.delete(name)
        self._write_files(self._path(name), files)

    def _write_files(self, directory: str, files: dict[str, bytes]) -> None:
        for file, data in sorted(files.items(), key=lambda item: item[0] == "state.json"):
            with self.fs.open_output_stream(f"{directory}/{file}") as stream:
                stream.write(data)
            if self.renames_atomically:
                _fsync(f"{directory}/{file}")

    def delete(self, name: str) -> None:
        self._delete(self._path(name))

    def _delete(self, path: str) -> None:
        if self.fs.get_file_info(path).type != pafs.FileType.NotFound:
            self.fs.delete_dir(path)


def _fsync(path: str) -> None:
    """Flush a local file's (or directory's) data to disk: a crash after this cannot lose it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _iteration(name: str) -> int:
    try:
        return int(name[len(_PREFIX):])
    except ValueError:
        return -1


def _sorted(names: list[str]) -> list[str]:
    return sorted((n for n in names if _iteration(n) >= 0), key=_iteration)


def save_checkpoint(directory: Location, ckpt: Checkpoint, *, keep: int = 2) -> Path | str:
    """Write ``ckpt`` under ``directory`` (a path or a URI) and keep only the newest ``keep``."""
    store = _Store(directory)
    name = f"{_PREFIX}{ckpt.iteration:08d}"
    opt_tensors, opt_meta = _optimizer_to_files(ckpt.optimizer)
    rng = ckpt.rng_state
    state = {
        "iteration": ckpt.iteration,
        "spec": ckpt.spec,
        "optimizer": opt_meta,
        "rng_state": base64.b64encode(rng.numpy().tobytes()).decode() if rng is not None else None,
        "metrics": ckpt.metrics,
    }
    store.write(name, {
        "model.safetensors": save({k: v.detach().cpu().contiguous() for k, v in ckpt.model.items()}),
        "optimizer.safetensors": save(opt_tensors),
        "state.json": json.dumps(state).encode(),
    })
    # Older checkpoints beyond ``keep``, and incomplete ones older than this one (a crash mid-write).
    names = _sorted(store.names())
    complete = [n for n in names if store.complete(n)]
    stale = [n for n in names if n not in complete and _iteration(n) < ckpt.iteration]
    for old in complete[:-keep] + stale:
        store.delete(old)
    logger.debug("checkpoint written: %s", store.where(name))
    return store.where(name)


def list_checkpoints(directory: Location) -> list[Path | str]:
    """Complete checkpoints, oldest first (temporary and incomplete ones are ignored)."""
    store = _Store(directory)
    return [store.where(n) for n in _sorted(store.names()) if store.complete(n)]


def load_checkpoint(path: Location) -> Checkpoint:
    """One checkpoint, by its path or URI (an entry of ``list_checkpoints``)."""
    text = str(path)
    if "://" in text:
        base, sep, query = text.partition("?")
        parent, _, name = base.rstrip("/").rpartition("/")
        store = _Store(f"{parent}{sep}{query}")
    else:
        store, name = _Store(Path(path).parent), Path(path).name
    state = json.loads(store.read(name, "state.json"))
    rng = state.get("rng_state")
    rng_state = torch.frombuffer(bytearray(base64.b64decode(rng)), dtype=torch.uint8) if rng else None
    return Checkpoint(
        iteration=state["iteration"],
        model=load(store.read(name, "model.safetensors")),
        optimizer=_optimizer_from_files(load(store.read(name, "optimizer.safetensors")), state["optimizer"]),
        spec=state["spec"],
        rng_state=rng_state,
        metrics=state.get("metrics", {}),
        path=store.where(name),
    )


def latest_checkpoint(directory: Location) -> Checkpoint | None:
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
