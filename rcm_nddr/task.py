"""The contract of a task type plug-in: target key, output channels, loss, metric, post-processing,
visualization, and what the multi-task objectives need to know about it (the form of its loss for uncertainty
weighting, the losses a cross-task transfer net into it may use). The core talks to tasks only through this
interface and never names a task type."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor

from rcm_nddr.protocols import PROTOCOLS

__all__ = ["PROTOCOLS", "DatasetInfo", "Metric", "Switch", "Task", "TrivialPredictor"]


@dataclass(frozen=True)
class DatasetInfo:
    """What a task needs to know about its dataset: class names per target key, and a name."""

    name: str
    classes: dict[str, list[str]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Switch:
    """One evaluation convention a task type's metric can follow either way (config
    ``evaluation.<task>.<name>``): its value under each protocol of ``PROTOCOLS`` (``presets``), and the
    values it takes: one of ``choices``, or with ``choices`` None a number >= 0 (or None when a preset is
    None, meaning "as the dataset says")."""

    presets: Mapping[str, Any]
    choices: tuple[Any, ...] | None = None
    help: str = ""

    def __post_init__(self) -> None:
        missing = [p for p in PROTOCOLS if p not in self.presets]
        if missing:
            raise ValueError(f"evaluation switch: no value for the protocols {missing}")

    def check(self, value: Any) -> Any:
        """``value`` if this switch takes it (ints given for a number become floats); ValueError otherwise."""
        if self.choices is not None:
            if isinstance(value, bool) != any(isinstance(c, bool) for c in self.choices) or value not in self.choices:
                raise ValueError(f"expected one of {', '.join(map(repr, self.choices))}, got {value!r}")
            return value
        if value is None and any(v is None for v in self.presets.values()):
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise ValueError(f"expected a number >= 0, got {value!r}")
        return float(value)


class Metric(ABC):
    """A streaming metric accumulator over a whole evaluation set.

    ``primary`` names the key of ``compute()`` used for model selection and Delta_MTL, and
    ``higher_is_better`` gives its direction. ``state`` names the attributes that hold the accumulated
    sums (tensors or numbers): accumulators of disjoint parts of a set (the processes of a distributed
    run) are combined by adding them (``merge``). A metric whose state is not additive overrides
    ``merge``; one with neither cannot be evaluated by several processes.
    """

    primary: ClassVar[str]
    higher_is_better: ClassVar[bool]
    state: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def update(self, prediction: Tensor, target: Tensor) -> None:
        """Accumulate a batch: ``prediction`` as returned by ``Task.postprocess``, ``target`` as loaded."""

    @abstractmethod
    def compute(self) -> dict[str, float]:
        """Metrics over everything accumulated since the last ``reset``."""

    @abstractmethod
    def reset(self) -> None: ...

    def merge(self, other: Metric) -> None:
        """Add the accumulated state of ``other`` (same type and settings) to this one."""
        if not self.state:
            raise NotImplementedError(
                f"{type(self).__name__} cannot combine the results of several processes: declare its additive "
                "accumulators in `state` or override `merge`"
            )
        if type(other) is not type(self):
            raise TypeError(f"cannot merge a {type(other).__name__} into a {type(self).__name__}")
        for name in self.state:
            setattr(self, name, getattr(self, name) + getattr(other, name))


class TrivialPredictor(ABC):
    """A constant predictor fitted on training targets (majority class, mean depth, ...).

    Used as the floor a trained model must clearly beat.
    """

    def fit(self, target: Tensor) -> None:  # noqa: B027 - optional: most trivial predictors need no data
        """Accumulate a batch of training targets."""

    @abstractmethod
    def predict(self, target: Tensor) -> Tensor:
        """A post-processed prediction with the batch and spatial shape of ``target``."""


class Task(ABC):
    """A task type. Subclasses are registered with ``@TASKS.register("name")``.

    An instance is one task of a run: ``name`` is how the config and the store call it, ``info``
    describes the dataset, and ``options`` are the task's keys under ``loss.<name>`` other than
    ``weight`` (an unknown option is a config error).
    """

    #: sample dict key holding this task's target
    target_key: ClassVar[str]
    #: the weight of this task's loss in the RCM/ASTMT protocol (the config may override it)
    default_loss_weight: ClassVar[float] = 1.0
    #: how a saved prediction is stored (``test.py --save-predictions``, ``rcm-nddr evaluate``):
    #: ``.npy`` (float32, H x W for one channel, H x W x C otherwise) or ``.png`` (uint8 map of
    #: 0-based class indices, for predictions that are H x W integer class maps)
    prediction_suffix: ClassVar[str] = ".npy"
    #: which form of Kendall et al.'s uncertainty weighting fits the task's loss: ``"classification"`` for a
    #: cross-entropy (a softmax or sigmoid likelihood: the loss is scaled by 1 / sigma^2) or ``"regression"``
    #: for an L1/L2-type loss (a Gaussian or Laplace likelihood: scaled by 1 / (2 sigma^2))
    loss_kind: ClassVar[str] = "regression"
    #: the cross-task consistency losses (``loss.consistency[*].loss``) the task accepts as the target of a
    #: transfer net, each handled by ``transfer_loss``; empty: no transfer net may map into this task type
    transfer_losses: ClassVar[tuple[str, ...]] = ()
    #: the evaluation conventions the task type's metric switches between, by switch name (see ``Switch``);
    #: ``metric()`` follows ``self.evaluation``
    evaluation_switches: ClassVar[Mapping[str, Switch]] = {}

    def __init__(self, name: str, info: DatasetInfo) -> None:
        self.name = name
        self.info = info
        #: the value of every evaluation switch the metric follows (``configure_evaluation``)
        self.evaluation: dict[str, Any] = self.protocol_switches("project")

    @classmethod
    def protocol_switches(cls, protocol: str) -> dict[str, Any]:
        """Every switch of the task type at its value under ``protocol`` (one of ``PROTOCOLS``)."""
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown evaluation protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
        return {name: switch.presets[protocol] for name, switch in cls.evaluation_switches.items()}

    def configure_evaluation(self, protocol: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Follow ``protocol``'s conventions, then ``overrides`` (switch name -> value); returns the switches.
        An unknown protocol, switch or value is a ValueError naming it."""
        switches = self.protocol_switches(protocol)
        for key, value in (overrides or {}).items():
            if key not in self.evaluation_switches:
                known = ", ".join(self.evaluation_switches) or "none"
                raise ValueError(f"task {self.name!r} has no evaluation switch {key!r} (it has: {known})")
            try:
                switches[key] = self.evaluation_switches[key].check(value)
            except ValueError as exc:
                raise ValueError(f"task {self.name!r}: evaluation switch {key!r}: {exc}") from exc
        self.evaluation = switches
        return dict(switches)

    @property
    @abstractmethod
    def out_channels(self) -> int:
        """Channels of the head's raw output."""

    @abstractmethod
    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Scalar loss of a raw head output (at target resolution), invalid pixels masked out."""

    def transfer_loss(self, kind: str, transferred: Tensor, reference: Tensor) -> Tensor:
        """Scalar loss ``kind`` (one of ``transfer_losses``) of a transfer net's raw output ``transferred``
        (B x out_channels x H x W, at the reference's resolution) against ``reference`` in this task's target
        format: a label from the batch, or this task's own (detached) prediction as returned by
        ``postprocess``. Invalid pixels of the reference are masked out."""
        raise NotImplementedError(
            f"task type {type(self).__name__} (task {self.name!r}) has no transfer loss {kind!r}"
            + (f" (it accepts: {', '.join(self.transfer_losses)})" if self.transfer_losses else "")
        )

    @abstractmethod
    def postprocess(self, output: Tensor) -> Tensor:
        """Raw head output (B x C x H x W) -> prediction in the target's format."""

    @abstractmethod
    def metric(self) -> Metric:
        """A fresh metric accumulator, following the evaluation switches ``self.evaluation``."""

    @abstractmethod
    def visualize(self, value: Tensor) -> Tensor:
        """One prediction or target (no batch dim, target format) -> uint8 RGB image 3 x H x W."""

    @abstractmethod
    def trivial(self) -> TrivialPredictor:
        """The trivial constant predictor of this task."""
