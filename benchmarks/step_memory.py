"""Peak training memory of one step, for the module-step benchmark (benchmarks/module_step.py).

On CUDA, the peak of ``torch.cuda.max_memory_allocated`` during one training step (the other
resident models' parameters are subtracted, this model's own added). On CPU, the peak of the
allocator's running total during one training step, from ``torch.profiler``'s memory records
(:func:`cpu_peak_bytes`), plus the parameter and optimizer-state bytes.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch
from torch import nn

from benchmarks.module_clock import sync


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        t.numel() * t.element_size()
        for s in optimizer.state.values()
        for t in s.values()
        if torch.is_tensor(t)
    )


def measure_memory(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    run_step: Callable[[], object],
    device: torch.device,
) -> int:
    """Peak training memory of one step, ``run_step()``, in bytes (see the module docstring)."""
    gc.collect()
    if device.type == "cuda":
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        before = torch.cuda.memory_allocated(device)  # every resident model, grads freed
        torch.cuda.reset_peak_memory_stats(device)
        run_step()
        # this step's transient memory (activations, grads, temporaries) + its own parameters
        # and optimizer state, which were already in `before`
        state = optimizer_state_bytes(optimizer)
        return torch.cuda.max_memory_allocated(device) - before + param_bytes(model) + state
    peak = cpu_peak_bytes(optimizer, run_step)
    return peak + param_bytes(model) + optimizer_state_bytes(optimizer)


def cpu_peak_bytes(optimizer: torch.optim.Optimizer, run_step: Callable[[], object]) -> int:
    """Peak bytes allocated above the level at the start of one training step, on CPU.

    From the allocator's own records: ``torch.profiler`` with ``profile_memory=True`` logs every
    CPU allocation and free (``[memory]`` events, signed sizes); their running sum in time order
    is the memory the step holds beyond what existed before it (parameters, optimizer state).
    """
    from torch.profiler import ProfilerActivity, profile

    optimizer.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run_step()
    records = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]"
    )
    level = peak = 0
    for _, nbytes in records:
        level += nbytes
        peak = max(peak, level)
    return peak
