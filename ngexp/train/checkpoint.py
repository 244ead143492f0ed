"""Checkpoints: everything needed to continue a run exactly, safe to load and verified.

- **No code runs when a checkpoint is loaded**: every checkpoint is read with
  ``torch.load(weights_only=True)``, so it may hold only tensors, numbers, strings, ``None`` and
  lists, tuples and dicts of them; the random number generator states are stored in those
  types (:func:`rng_state`). A file that needs more (a pickled object) is refused.
- **Integrity**: ``last.pt`` is written to a temporary file, flushed to disk, hashed and renamed;
  its SHA-256 goes to ``last.pt.sha256`` (``sha256sum`` format) the same way. Before a resume the
  digest is checked, so a flipped byte or a truncated file is never trained on.
- **The previous good checkpoint is kept**: saving moves ``last.pt`` to ``previous.pt`` first, so
  a crash at any point (or a corrupted ``last.pt``) leaves a verified checkpoint to resume from
  (:func:`load_resumable`).
- Loading maps everything to the CPU; the model, optimizer and preconditioner move their state
  to their device (RNG states must stay on the CPU, as must Adam's step counters).
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import random
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ngexp.errors import UserError

#: Checkpoint names: the newest and the one before it.
LAST, PREVIOUS = "last.pt", "previous.pt"


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """States of every random number generator a run touches, in types ``torch.load``'s
    ``weights_only`` mode accepts (the numpy key array as a tensor)."""
    version, keys, gauss = random.getstate()
    kind, np_keys, position, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "keys": list(keys), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "position": int(position), "has_gauss": int(has_gauss),
                  "cached": float(cached)},
        "torch": torch.get_rng_state(),
        "data": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    python = state["python"]
    random.setstate((python["version"], tuple(python["keys"]), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32),
                         numpy["position"], numpy["has_gauss"], numpy["cached"]))
    torch.set_rng_state(state["torch"].cpu())
    generator.set_state(state["data"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def all_finite(tree: Any) -> bool:
    """Whether every floating-point tensor in a nested state (dicts, lists, tuples) is finite
    (one host sync for the whole tree)."""
    flags = [t.isfinite().all() for t in _tensors(tree) if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def _tensors(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for value in tree.values() for t in _tensors(value)]
    if isinstance(tree, (list, tuple)):
        return [t for value in tree for t in _tensors(value)]
    return []


def digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_synced(path: Path, data: bytes) -> None:
    """Write ``data`` to ``.<name>.tmp`` beside ``path``, fsync, rename over ``path``; the
    temporary file is removed when anything fails (a full disk raises ``OSError``)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` with its digest beside it (module docstring). Saving
    ``last.pt`` first moves the current one (and its digest) to ``previous.pt``. The state is
    serialized in memory first, so a full disk surfaces as an ``OSError`` of the write."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name == LAST and path.is_file():
        previous = path.with_name(PREVIOUS)
        os.replace(path, previous)
        if digest_path(path).is_file():
            os.replace(digest_path(path), digest_path(previous))
    _write_synced(path, data)
    _write_synced(digest_path(path), f"{hashlib.sha256(data).hexdigest()}  {path.name}\n".encode())


def verify(path: Path) -> str | None:
    """``None`` when ``path`` matches its recorded digest, else why not."""
    if not path.is_file():
        return "missing"
    record = digest_path(path)
    if not record.is_file():
        return "no digest recorded beside it"
    try:
        expected = record.read_text(encoding="ascii").split()[0]
    except (OSError, UnicodeDecodeError, IndexError):
        return "unreadable digest"
    return None if sha256_of(path) == expected else "content does not match its SHA-256"


def read_checkpoint(path: Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` on the CPU; a file that is no checkpoint or
    would need to run code raises :class:`UserError`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if zipfile.is_zipfile(path) and "weights_only" in str(error).lower():
            raise UserError(f"{path} holds objects that would run code when loaded; ngexp loads "
                            f"checkpoints with weights_only=True and refuses it") from None
        raise UserError(f"{path} is not a PyTorch checkpoint") from None
    except Exception as error:  # zip or torch errors of a truncated or foreign file
        raise UserError(f"{path} is not a readable PyTorch checkpoint "
                        f"({type(error).__name__})") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} is not an ngexp checkpoint (holds {type(state).__name__})")
    return state


@dataclass(frozen=True)
class Resumable:
    """The checkpoint a run resumes from (``None`` = start over) and what was skipped, why."""

    state: dict[str, Any] | None
    path: Path | None
    skipped: list[str]


def load_resumable(folder: Path) -> Resumable:
    """The newest verified, loadable checkpoint of ``folder``: ``last.pt``, else
    ``previous.pt``, else none; ``skipped`` says which were passed over and why."""
    skipped = []
    for name in (LAST, PREVIOUS):
        path = folder / name
        if not path.exists():
            continue
        problem = verify(path)
        if problem is None:
            try:
                return Resumable(read_checkpoint(path), path, skipped)
            except UserError as error:
                problem = str(error)
        skipped.append(f"{name}: {problem}")
    return Resumable(None, None, skipped)


def resolve_init_from(location: str) -> Path:
    """A checkpoint file, or a run directory (its ``checkpoints/last.pt``)."""
    path = Path(location)
    if path.is_dir():
        path = path / "checkpoints" / LAST
    if not path.is_file():
        raise UserError(f"init_from={location!r}: no checkpoint found (expected a .pt file or a "
                        f"run directory containing checkpoints/last.pt)")
    return path


def init_weights(location: str) -> dict[str, torch.Tensor]:
    """The model weights of the checkpoint at ``location`` (``init_from``)."""
    state = read_checkpoint(resolve_init_from(location))
    weights = state.get("model")
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor)
                                                for v in weights.values()):
        raise UserError(f"init_from={location!r} holds no model weights")
    return weights
