"""The whole training step as one CUDA graph: captured once, replayed every step (`--cuda-graphs`).

Why: at the paper's batch 64 the host took as long to enqueue the dual-student step (35.8 ms on an H200: ~1,500
kernel launches through Python and the dispatcher) as the GPU needed three times over to run it (15.6 ms). A
replayed graph costs one launch, so the GPU, not the host, sets the pace.

How (the recipe of torch.cuda.graphs' whole-network capture):
- the first `warmup` steps run eagerly on a side stream (cuDNN autotuning, lazy optimizer state such as momentum
  buffers, allocator pools), then the step is captured with static input buffers and replayed; every later step
  copies its inputs into those buffers and replays;
- the learning rate is a device tensor while the optimizers are captured (a Python float would be baked into the
  graph); the scheduler keeps its float and `fill_`s the tensor before each replay (a kernel, no sync);
- a step whose inputs differ in shape, dtype or presence (a short batch after skipped corrupt samples) runs
  eagerly on the same parameters and optimizer state, so the schedule and the results stay those of eager steps;
- what must not be captured is refused before capture: fp16 (the GradScaler's step decisions are made on the
  host), DDP (its hooks synchronise across processes), a CPU device, and torch.compile modes that make CUDA graphs
  of their own (reduce-overhead, max-autotune). Compiled students in the other modes (default,
  max-autotune-no-cudagraphs: Inductor's kernels, BatchNorm fused with its neighbours) are captured like eager
  ones with `--cuda-graphs on` (`auto` waits for a GPU run to compare them): compilation happens in the eager
  warm-up steps, the capture records the compiled kernels.
Results equal eager steps' up to the order of floating-point reductions (tests/test_graphed.py, marker `gpu`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from pipeline.core.errors import ConfigError

GRAPH_CHOICES = ("auto", "on", "off")
COMPILE_OWN_GRAPHS = ("reduce-overhead", "max-autotune")  # torch.compile modes that capture CUDA graphs themselves


def graphs_wanted(choice: str, *, device: torch.device, dtype: torch.dtype, world_size: int,
                  compile_mode: str = "off") -> bool:
    """Whether the step is captured: `on` refuses an impossible combination in one line (compiled students in
    the modes without graphs of their own are possible), `auto` takes graphs wherever they apply and were measured
    (CUDA, one process, bf16 or fp32, no torch.compile), `off` never."""
    if choice not in GRAPH_CHOICES:
        raise ConfigError(f"--cuda-graphs must be one of {', '.join(GRAPH_CHOICES)}, got {choice!r}")
    why_not = None
    if device.type != "cuda":
        why_not = f"the device is {device.type}, CUDA graphs need a CUDA device"
    elif dtype == torch.float16:
        why_not = "--amp fp16 steps through GradScalers whose decisions are made on the host; use bf16 or fp32"
    elif world_size > 1:
        why_not = "under torchrun DDP's hooks synchronise processes inside the step"
    elif compile_mode in COMPILE_OWN_GRAPHS:
        why_not = (f"--compile {compile_mode} captures CUDA graphs of its own; use --compile default or "
                   f"max-autotune-no-cudagraphs inside the step's graph")
    if choice == "on" and why_not is not None:
        raise ConfigError(f"--cuda-graphs on: {why_not} (use --cuda-graphs auto or off)")
    if choice == "auto" and compile_mode != "off":
        return False  # compiled students join the graph when asked (`on`) until a GPU run has compared them
    return choice != "off" and why_not is None


def _signature(inputs: Sequence[torch.Tensor | None]) -> tuple:
    return tuple(None if t is None else (tuple(t.shape), t.dtype, t.stride()) for t in inputs)


class GraphedStep:
    """Calls `fn(*inputs) -> outputs` (a pytree of tensors) eagerly for `warmup` calls, then captures it once
    and replays the graph for inputs of the same signature; others run eagerly.

    `optimizers`' learning rates become device tensors during the capture (see the module docstring); call
    `reset()` after anything replaces tensors the graph holds (e.g. `optimizer.load_state_dict`)."""

    def __init__(self, fn: Callable[..., Any], optimizers: Sequence[torch.optim.Optimizer], device: torch.device,
                 warmup: int = 3):
        self.fn, self.optimizers, self.device, self.warmup = fn, list(optimizers), device, warmup
        self.calls = 0  # eager calls since the last reset (warm-up)
        self.replays = 0
        self.eager_fallbacks = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self._key: tuple | None = None
        self._static_in: list[torch.Tensor | None] = []
        self._static_out: Any = None
        self._lrs: list[list[torch.Tensor]] = []  # per optimizer, per param group

    def reset(self) -> None:
        """Forget the graph (the next calls warm up and capture again)."""
        self.graph, self._key, self._static_in, self._static_out, self._lrs = None, None, [], None, []
        self.calls = 0

    def __call__(self, *inputs: torch.Tensor | None) -> Any:
        if self.graph is not None:
            if _signature(inputs) == self._key:
                for dst, src in zip(self._static_in, inputs):
                    if dst is not None:
                        dst.copy_(src, non_blocking=True)
                self._sync_lrs()
                self.graph.replay()
                self.replays += 1
                return self._static_out
            self.eager_fallbacks += 1
            return self.fn(*inputs)
        if self.calls < self.warmup:
            self.calls += 1
            return self._side_stream(self.fn, *inputs)
        return self._capture(inputs)

    def _side_stream(self, fn: Callable[..., Any], *inputs: Any) -> Any:
        side, main = torch.cuda.Stream(self.device), torch.cuda.current_stream(self.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            out = fn(*inputs)
        main.wait_stream(side)
        return out

    def _capture(self, inputs: Sequence[torch.Tensor | None]) -> Any:
        """Capture the step on static copies of `inputs`, then replay it once: this call's step."""
        self._static_in = [None if t is None else t.clone(memory_format=torch.preserve_format) for t in inputs]
        self._key = _signature(inputs)
        self._lrs = [[torch.tensor(float(g["lr"]), dtype=torch.float32, device=self.device) for g in o.param_groups]
                     for o in self.optimizers]
        floats = [[g["lr"] for g in o.param_groups] for o in self.optimizers]
        for o, lrs in zip(self.optimizers, self._lrs):
            for g, t in zip(o.param_groups, lrs):
                g["lr"] = t
        # grads set to None before capture: backward then allocates them from the graph's own pool
        for o in self.optimizers:
            o.zero_grad(set_to_none=True)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the loader's prefetch thread may allocate and decode on its own stream meanwhile
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                out = self.fn(*self._static_in)
        finally:
            for o, lr_floats in zip(self.optimizers, floats):
                for g, lr in zip(o.param_groups, lr_floats):
                    g["lr"] = lr
        self.graph, self._static_out = graph, out
        self._sync_lrs()
        graph.replay()
        self.replays += 1
        return out

    def _sync_lrs(self) -> None:
        """The schedulers' current (float) learning rates into the tensors the captured optimizers read."""
        for o, lrs in zip(self.optimizers, self._lrs):
            for g, t in zip(o.param_groups, lrs):
                t.fill_(float(g["lr"]))
