"""Time inside a model's recalibration modules (SE, MS-SAR or one of the zoo's) during training
steps, from module hooks: :class:`ModuleClock`, used by the module-step benchmark
(benchmarks/module_step.py)."""

from __future__ import annotations

import time

import torch
from torch import nn

from mssar_cli.recalibration.mssar import MSSAR
from mssar_cli.recalibration.se import SqueezeExcitation
from mssar_cli.recalibration.zoo import ZooModule

# the classes every registered module is an instance of (ZooModule: ECA, CBAM, GE, CA, GC)
MODULE_CLASSES = (SqueezeExcitation, MSSAR, ZooModule)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ModuleClock:
    """Seconds spent inside a model's recalibration modules (:data:`MODULE_CLASSES`) during
    training steps.

    Forward: from each module's forward pre-hook to its forward hook. Backward: from its full
    backward pre-hook (the gradient of its output is ready) to its full backward hook (the
    gradients of its inputs are), which covers the module's whole backward, the rebuild of the BN
    output it multiplies included. Unlike a difference of whole steps, this leaves out the noise
    of the rest of the network; the hooks cost every variant alike. The module's input must
    require a gradient (as in every benchmark network): otherwise PyTorch fires the full
    backward hook before the module's backward, so a forward with such an input raises.
    """

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.device = device
        self.forward = self.backward = 0.0
        self._started: dict[int, float] = {}
        self._handles = []
        for module in model.modules():
            if isinstance(module, MODULE_CLASSES):
                self._handles += [
                    module.register_forward_pre_hook(self._start_forward),
                    module.register_forward_hook(self._stop_forward),
                    module.register_full_backward_pre_hook(self._start),
                    module.register_full_backward_hook(self._stop_backward),
                ]
        if not self._handles:
            raise ValueError("the model has no recalibration module")

    def _now(self) -> float:
        sync(self.device)
        return time.perf_counter()

    def _start(self, module: nn.Module, _grad_outputs) -> None:
        self._started[id(module)] = self._now()

    def _start_forward(self, module: nn.Module, inputs) -> None:
        if torch.is_grad_enabled() and not any(
            torch.is_tensor(t) and t.requires_grad for t in inputs
        ):
            raise RuntimeError(
                f"ModuleClock: the input of {type(module).__name__} does not require a gradient, "
                "so its backward could not be timed"
            )
        self._started[id(module)] = self._now()

    def _stop_forward(self, module: nn.Module, _inputs, _output) -> None:
        self.forward += self._now() - self._started.pop(id(module))

    def _stop_backward(self, module: nn.Module, _grad_inputs, _grad_outputs) -> None:
        self.backward += self._now() - self._started.pop(id(module))

    def reset(self) -> None:
        self.forward = self.backward = 0.0

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
