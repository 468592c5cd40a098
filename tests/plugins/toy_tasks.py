"""Task types defined outside the package, loaded through a config's ``plugins:`` list in the tests."""

import torch
import torch.nn.functional as F

from rcm_nddr.objectives import Weighting
from rcm_nddr.registry import TASKS, WEIGHTINGS
from rcm_nddr.task import Metric, Task, TrivialPredictor


class InverseDepthError(Metric):
    primary = "mse"
    higher_is_better = False
    state = ("sq", "n")

    def __init__(self) -> None:
        self.reset()

    def update(self, prediction, target):
        valid = target > 0
        inverse = torch.where(valid, 1.0 / target.clamp_min(1e-6), torch.zeros_like(target))
        self.sq += float(((prediction - inverse)[valid] ** 2).sum())
        self.n += int(valid.sum())

    def compute(self):
        return {"mse": self.sq / max(self.n, 1)}

    def reset(self):
        self.sq, self.n = 0.0, 0


class Zero(TrivialPredictor):
    def predict(self, target):
        return torch.zeros_like(target)


@TASKS.register("inverse_depth")
class InverseDepth(Task):
    """Predicts 1 / depth with an L2 loss: a task type the package itself does not have."""

    target_key = "depth"

    def __init__(self, name, info, scale: float = 1.0):
        super().__init__(name, info)
        self.scale = scale

    @property
    def out_channels(self):
        return 1

    def loss(self, output, target):
        valid = target > 0
        inverse = torch.where(valid, 1.0 / target.clamp_min(1e-6), torch.zeros_like(target))
        return self.scale * F.mse_loss(output[valid], inverse[valid]) if valid.any() else output.sum() * 0

    def postprocess(self, output):
        return output

    def metric(self):
        return InverseDepthError()

    def visualize(self, value):
        v = (value / value.max().clamp_min(1e-6) * 255).clamp(0, 255).to(torch.uint8)
        return v.expand(3, -1, -1).clone()

    def trivial(self):
        return Zero()


@TASKS.register("nan_after_4")
class NanAfterFour(InverseDepth):
    """Its loss turns NaN at the 5th training step, to exercise the non-finite-loss abort."""

    def __init__(self, name, info):
        super().__init__(name, info)
        self.calls = 0

    def loss(self, output, target):
        self.calls += 1
        loss = super().loss(output, target)
        return loss * float("nan") if self.calls >= 5 else loss


@WEIGHTINGS.register("first_only")
class FirstOnly(Weighting):
    """A plug-in loss weighting: the first task's loss alone, times ``scale``."""

    def __init__(self, tasks, weights, scale: float = 1.0):
        super().__init__(tasks, weights)
        self.scale = float(scale)

    def current(self):
        weights = torch.zeros(len(self.names))
        weights[0] = self.scale
        return weights
