"""Training checkpoints (written atomically, read back with ``weights_only=True``: no pickled code)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, BinaryIO

import torch

from rcm_nddr.errors import UserError
from rcm_nddr.files import atomic_write

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
