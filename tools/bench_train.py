"""Train-step benchmark: kdpipe's dual-student step against a plain PyTorch loop, and the online
teacher against given (cached) teacher logits. Everything runs in one process on synthetic tensors
already on the device, so data loading is out of the picture.

  python tools/bench_train.py --image-size 64 --batch-size 32      (or: kdpipe bench train ...)

Ratios, with the machine named:
  trainer / plain loop   steps/s of Distiller.step (+ the loop's on-device stats and NaN watch) over a
                         hand-written loop with the same models, losses, optimizers and schedule
                         (target >= 0.98: the trainer adds no overhead);
  cached / online        steps/s with teacher logits given over steps/s with a teacher forward
                         (the saving a teacher cache brings).
Variants run in alternating rounds (A B, B A, ...); ratios are the median over rounds of the ratio
within a round, because a shared machine's load drifts; the ratio of the fastest rounds is printed too
(like timeit's minimum, the least disturbed estimate on a busy machine).
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from pathlib import Path
from collections.abc import Callable

import torch
import torch.nn.functional as F

from trainer.config import lr_factor, make_config
from trainer.engine.loop import StepLog
from trainer.engine.models import build_model
from trainer.engine.runtime import autocast, precision_dtype, resolve_device
from trainer.engine.step import Distiller, StepStats


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA), torch {torch.__version__}"
    return (f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch threads, torch {torch.__version__}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fresh_students(names: list[str], num_classes: int, seed: int) -> list[torch.nn.Module]:
    torch.manual_seed(seed)
    return [build_model(n, num_classes) for n in names]


def trainer_step_fn(cfg, names, num_classes, device, teacher, images, labels, t_logits) -> Callable[[], None]:
    """kdpipe's hot loop body: Distiller.step, stats accumulation, the step log."""
    d = Distiller(cfg, fresh_students(names, num_classes, 0), teacher=teacher, device=device, steps_per_epoch=10**6)
    acc = StepStats.zeros(len(names), device)
    log_every = 20
    log = StepLog(d.names, device, capacity=log_every)
    state = {"step": 0}

    def step() -> None:  # the loop's per-step body; its host sync (log.flush) comes every log_every steps
        stats = d.step(images, labels, t_logits)
        acc.add_(stats)
        log.observe(stats, state["step"], d.lr())
        state["step"] += 1
        if state["step"] % log_every == 0:
            log.flush(Path("."), 10**6)
    return step


def plain_step_fn(cfg, names, num_classes, device, images, labels, t_logits) -> Callable[[], None]:
    """The same training written as a plain PyTorch loop, with nothing of kdpipe's step in it."""
    students = [m.to(device, memory_format=torch.channels_last).train()
                for m in fresh_students(names, num_classes, 0)]
    o, lc = cfg.optim, cfg.loss
    fused = True if device.type == "cuda" else None  # the same optimizer kernel as the trainer's
    opts = [torch.optim.SGD(m.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, fused=fused)
            for m in students]
    scheds = [torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, 10**6, 0)) for opt in opts]
    dtype = precision_dtype(cfg.amp, device)
    tau, C = lc.tau, t_logits.shape[1]

    def step() -> None:
        with autocast(device, dtype):
            logits = [m(images) for m in students]
        p_t = F.softmax(t_logits / tau, dim=1)
        w = 1 + (F.softmax(t_logits, 1) * F.log_softmax(t_logits, 1)).sum(1) / math.log(C)
        total = 0.0
        for i, z in enumerate(logits):
            log_q = F.log_softmax(z.float() / tau, dim=1)
            kd = ((p_t * (p_t.clamp_min(1e-30).log() - log_q)).sum(1) * w).mean() * tau**2
            peer_p = F.softmax(logits[1 - i].detach().float() / tau, dim=1)
            peer = F.kl_div(log_q, peer_p, reduction="batchmean") * tau**2
            total = total + lc.alpha * F.cross_entropy(z.float(), labels) + lc.beta * kd + lc.gamma * peer
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        total.backward()
        for opt, sc in zip(opts, scheds):
            opt.step()
            sc.step()
    return step


def steps_per_s(fn: Callable[[], None], steps: int, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return steps / (time.perf_counter() - t0)


def interleaved(fns: dict[str, Callable[[], None]], steps: int, warmup: int, repeats: int,
                device: torch.device) -> dict[str, list[float]]:
    """steps/s of each variant per round; rounds alternate the order (A B, B A, ...) so a drifting
    machine load hits both variants alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    out: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            out[name].append(steps_per_s(fns[name], steps, device))
    return out


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a/b measured in the same round (robust to load that changes between rounds)."""
    return statistics.median(x / y for x, y in zip(a, b))


def run(students: list[str], teacher_name: str, image_size: int, batch_size: int, num_classes: int, steps: int,
        warmup: int, repeats: int, device_name: str, amp: str) -> dict:
    device = resolve_device(device_name)
    cfg = make_config("dual", tuple(students), amp=amp)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=g).to(device)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, num_classes, (batch_size,), generator=g).to(device)
    t_logits = (3 * torch.randn(batch_size, num_classes, generator=g)).to(device)
    torch.manual_seed(1)
    teacher = build_model(teacher_name, num_classes)
    print(f"machine: {machine(device)}; amp {precision_dtype(amp, device)}; {image_size}px, batch {batch_size}, "
          f"{num_classes} classes; {repeats} x {steps} steps after {warmup} warm-up")
    r1 = interleaved({"trainer": trainer_step_fn(cfg, students, num_classes, device, None, images, labels, t_logits),
                      "plain": plain_step_fn(cfg, students, num_classes, device, images, labels, t_logits)},
                     steps, warmup, repeats, device)
    r2 = interleaved({"cached": trainer_step_fn(cfg, students, num_classes, device, None, images, labels, t_logits),
                      "online": trainer_step_fn(cfg, students, num_classes, device, teacher, images, labels, None)},
                     steps, warmup, repeats, device)
    med = {k: statistics.median(v) for k, v in {**r1, **r2}.items()}
    result = {"machine": machine(device), "steps_per_s": med, "runs": {**r1, **r2},
              "trainer_over_plain": paired_ratio(r1["trainer"], r1["plain"]),
              "cached_over_online": paired_ratio(r2["cached"], r2["online"]),
              "trainer_over_plain_best": max(r1["trainer"]) / max(r1["plain"]),
              "cached_over_online_best": max(r2["cached"]) / max(r2["online"]),
              "images_per_s": {k: v * batch_size for k, v in med.items()}}
    s = "+".join(students)
    print(f"dual-student step ({s}): trainer {med['trainer']:.2f} steps/s, plain loop {med['plain']:.2f} steps/s, "
          f"ratio trainer/plain = {result['trainer_over_plain']:.3f} (median of {repeats} paired rounds; "
          f"target >= 0.98)")
    print(f"teacher ({teacher_name}): logits given {med['cached']:.2f} steps/s, online forward "
          f"{med['online']:.2f} steps/s, ratio cached/online = {result['cached_over_online']:.2f}x")
    spread = {k: f"{min(v):.2f}-{max(v):.2f}" for k, v in result["runs"].items()}
    print(f"steps/s range over rounds (machine load drifts): {spread}")
    print(f"fastest round of each (the least disturbed): trainer/plain = {result['trainer_over_plain_best']:.3f}, "
          f"cached/online = {result['cached_over_online_best']:.2f}x")
    return result


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kdpipe bench train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--students", default="resnet18,mobilenet_v2")
    p.add_argument("--teacher", default="resnet50")
    p.add_argument("--image-size", type=int, default=None, help="default: 224 on CUDA, 64 on CPU")
    p.add_argument("--batch-size", type=int, default=None, help="default: 64 on CUDA, 32 on CPU")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--steps", type=int, default=None, help="timed steps per round (default 50 CUDA, 2 CPU)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=None, help="rounds (default 5 CUDA, 8 CPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    a = parse(argv)
    cuda = resolve_device(a.device).type == "cuda"
    return run(a.students.split(","), a.teacher, a.image_size or (224 if cuda else 64),
               a.batch_size or (64 if cuda else 32), a.num_classes, a.steps or (50 if cuda else 2), a.warmup,
               a.repeats or (5 if cuda else 8), a.device, a.amp)


if __name__ == "__main__":
    main()
