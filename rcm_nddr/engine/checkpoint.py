"""Training checkpoints (written atomically, read back with ``weights_only=True``: no pickled code).

A checkpoint's model state leaves out what the run rebuilds identically: the frozen filter bank (from the
store or the pretrained weights) and the stored tasks the group reads (frozen, from the store). It records
their names and sha256 instead (``rebuilt``), and loading puts the run's own tensors back after checking
that sha256; a checkpoint written with them in it (an older version's) loads as it is."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor, nn

from rcm_nddr.errors import UserError
from rcm_nddr.files import atomic_write
from rcm_nddr.nn.accounting import owned_by
from rcm_nddr.nn.filter_bank import filter_bank_sha256

#: the buffers of the shared filter bank: a conv's weight and, for a conv with a bias (VGG), its bias
BANK_BUFFERS = ("filter_bank", "filter_bank_bias")

#: what to do about an unreadable ``last.pt`` (the default of ``load_checkpoint``)
RESUME_REMEDY = (
    "delete it and start the run again without --resume (--auto-resume starts afresh when there is no checkpoint)"
)


class CheckpointError(UserError):
    """A checkpoint that cannot be read (truncated, corrupt, not a checkpoint) or that does not fit the run."""


class _Sink:
    """The file object ``torch.save`` writes through, keeping the first OSError of a write (e.g. ENOSPC)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.error = f, None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        try:
            self.f.flush()
        except OSError as exc:
            self.error = self.error or exc
            raise


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically. A full disk or a directory that cannot be written is an
    OSError naming ``path`` (not the temporary file beside it); the previous checkpoint stays intact."""
    path = Path(path)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            sink = _Sink(f)
            try:
                torch.save(state, sink)
            except Exception:
                if sink.error is not None:  # torch's writer reports a full disk as a RuntimeError of its own
                    raise sink.error from None
                raise

    atomic_write(path, write)  # an OSError of the temporary file is raised naming ``path``


def load_checkpoint(path: str | Path, remedy: str = RESUME_REMEDY) -> dict[str, Any]:
    """The state saved at ``path``. A file that is not a readable checkpoint is a CheckpointError naming it,
    ending with ``remedy`` (what the user can do about it)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise  # no permission, an I/O error: reported with the path by the commands
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path} is unreadable, truncated or corrupt ({cause(exc)}); {remedy}"
        ) from exc
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a training checkpoint (no 'model' state in it); {remedy}")
    return state


def rebuilt_keys(model: nn.Module) -> list[str]:
    """The state-dict entries of ``model`` that a checkpoint leaves out: the filter bank's buffers and every
    tensor of the stored tasks the model reads frozen (``model.frozen``)."""
    frozen = getattr(model, "frozen", ())
    return [
        key
        for key in model.state_dict()
        if key.rpartition(".")[2] in BANK_BUFFERS or any(owned_by(key, task) for task in frozen)
    ]


def tensors_sha256(tensors: Mapping[str, Tensor]) -> str:
    """sha256 over tensors by sorted name: name, dtype, shape and the raw bytes."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def rebuilt_record(model: nn.Module) -> dict[str, Any]:
    """What a checkpoint of ``model`` records about the tensors it leaves out (``rebuilt_keys``): their
    names and sha256, the sha256 of the filter bank alone (``filter_bank_sha256``, None without one) and the
    frozen tasks. The tensors never change during a run: a trainer computes this once."""
    state = model.state_dict()
    keys = rebuilt_keys(model)
    bank = getattr(getattr(model, "backbone", None), "filter_bank", None)  # by conv name, as a store records it
    return {
        "keys": keys,
        "sha256": tensors_sha256({k: state[k] for k in keys}),
        "filter_bank_sha256": filter_bank_sha256(bank()) if callable(bank) else None,
        "frozen_tasks": sorted(getattr(model, "frozen", ())),
    }


def checkpoint_state(model: nn.Module, rebuilt: Mapping[str, Any]) -> dict[str, Any]:
    """``{"model": ..., "rebuilt": ...}``: the model's state dict without the ``rebuilt`` entries."""
    left_out = set(rebuilt["keys"])
    return {"model": {k: v for k, v in model.state_dict().items() if k not in left_out}, "rebuilt": dict(rebuilt)}


def model_state(model: nn.Module, state: Mapping[str, Any], path: str | Path, remedy: str) -> dict[str, Tensor]:
    """The full state dict of a checkpoint ``state`` (read from ``path``) for ``model``: the entries it left
    out are taken from ``model`` after checking their sha256 against the recorded one (CheckpointError
    naming both, ending with ``remedy``, when the run rebuilt another bank or other stored tasks)."""
    weights = dict(state["model"])
    rebuilt = state.get("rebuilt")
    if rebuilt is None:  # an older checkpoint holds everything
        return weights
    own = model.state_dict()
    missing = [k for k in rebuilt["keys"] if k not in own]
    if missing:
        raise CheckpointError(f"{path} does not fit the model of this config (it has no {missing[:3]}); {remedy}")
    actual = tensors_sha256({k: own[k] for k in rebuilt["keys"]})
    if actual != rebuilt["sha256"]:
        tasks = rebuilt.get("frozen_tasks") or []
        what = "the filter bank" + (f" and the stored tasks {tasks}" if tasks else "")
        raise CheckpointError(
            f"{path} was trained on {what} with sha256 {rebuilt['sha256']} (filter bank sha256 "
            f"{rebuilt.get('filter_bank_sha256')}), but this run builds them with sha256 {actual}: another "
            f"backbone.weights, decomposition or store; {remedy}"
        )
    weights.update({k: own[k] for k in rebuilt["keys"]})
    return weights


def load_model_state(model: nn.Module, state: Mapping[str, Any], path: str | Path, remedy: str) -> None:
    """Load a checkpoint ``state`` (read from ``path``) into ``model`` (``model_state``); a state that does not
    fit is a CheckpointError naming ``path`` and ending with ``remedy``."""
    weights = model_state(model, state, path, remedy)
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit the model of this config ({cause(exc)}); {remedy}") from exc


def cause(exc: BaseException) -> str:
    """The gist of an error torch raised, for a one-line message: its first two lines' first sentence, with
    the exception's type where that is all too short to say anything."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = " ".join(lines[:2]).split(". ")[0][:300]
    return text if len(text) >= 40 else f"{type(exc).__name__}: {text}".rstrip(": ")


def rng_state() -> dict[str, Any]:
    """Every random number generator the training loop draws from in the main process."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
