"""CUDA-graph steps (trainer/engine/graphed.py): when they apply, and on a GPU that they equal eager steps."""
from __future__ import annotations

import pytest
import torch

from pipeline.core.errors import ConfigError
from trainer.config import make_config
from trainer.engine.graphed import graphs_wanted
from trainer.engine.models import build_model
from trainer.engine.step import Distiller, step_seed

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("kw, expected", [
    ({}, True),
    ({"device": CPU}, False),
    ({"dtype": torch.float16}, False),
    ({"world_size": 2}, False),
    ({"compile_mode": "reduce-overhead"}, False),
    ({"compile_mode": "max-autotune"}, False),
])
def test_auto_takes_graphs_only_where_they_apply(kw, expected):
    args = {"device": CUDA, "dtype": torch.bfloat16, "world_size": 1, "compile_mode": "off", **kw}
    assert graphs_wanted("auto", **args) is expected
    assert graphs_wanted("off", **args) is False
    if expected:
        assert graphs_wanted("on", **args) is True
    else:
        with pytest.raises(ConfigError, match="--cuda-graphs on: "):
            graphs_wanted("on", **args)


@pytest.mark.parametrize("mode", ["default", "max-autotune-no-cudagraphs"])
def test_compiled_students_join_the_graph_only_when_asked(mode):
    """Inductor's kernels inside the step's graph: possible (`on`), not yet `auto` (no GPU has compared them)."""
    args = {"device": CUDA, "dtype": torch.bfloat16, "world_size": 1, "compile_mode": mode}
    assert graphs_wanted("on", **args) is True
    assert graphs_wanted("auto", **args) is False and graphs_wanted("off", **args) is False


def test_unknown_choice_is_a_config_error():
    with pytest.raises(ConfigError, match="--cuda-graphs must be one of auto, on, off"):
        graphs_wanted("yes", device=CUDA, dtype=torch.bfloat16, world_size=1)


def _distiller(graphs: str, device: torch.device, students=("tiny_cnn", "tiny_mobilenet"), classes: int = 5,
               **fields):
    cfg = make_config("dual", students, batch_size=8, epochs=1, device=str(device), cuda_graphs=graphs,
                      image_size=24, **fields)
    torch.manual_seed(0)
    return Distiller(cfg, [build_model(n, classes) for n in cfg.students], teacher=None, device=device,
                     steps_per_epoch=20)


def test_cpu_steps_stay_eager_under_auto_and_on_is_refused():
    assert _distiller("auto", CPU).graphed is None
    with pytest.raises(ConfigError, match="CUDA graphs need a CUDA device"):
        _distiller("on", CPU)


def _batches(n: int, device: torch.device, classes: int = 5, size: int = 24, batch: int = 8):
    g = torch.Generator().manual_seed(1)
    out = []
    for k in range(n):
        b = batch if k != n - 2 else batch - 3  # one short batch: runs eagerly between replays
        out.append((torch.randn(b, 3, size, size, generator=g).to(device).contiguous(memory_format=torch.channels_last),
                    torch.randint(0, classes, (b,), generator=g).to(device),
                    (3 * torch.randn(b, classes, generator=g)).to(device)))
    return out


def _train(graphs: str, device: torch.device, students, steps: int = 12, **fields) -> tuple[list, list, Distiller]:
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    d = _distiller(graphs, device, students, **fields)
    losses = []
    for k, (x, y, t) in enumerate(_batches(steps, device)):
        torch.manual_seed(step_seed(0, k))
        d.lr_before_last_step = d.lr()
        s = d.step(x, y, t)
        losses.append((s.terms[:, 0] / s.count).tolist())
    return losses, [{k: v.detach().float().cpu() for k, v in m.state_dict().items()} for m in d.students], d


def _assert_same_training(a: tuple, b: tuple, rel: float, abs_: float) -> None:
    """Two `_train` results: per-step losses and final weights (BatchNorm statistics included) within tolerance."""
    for x, y in zip(a[0], b[0]):
        assert x == pytest.approx(y, rel=rel, abs=abs_)
    for sa, sb in zip(a[1], b[1]):
        for k, v in sa.items():
            assert torch.allclose(v, sb[k], rtol=rel, atol=abs_ * 2), k


@pytest.mark.gpu
@pytest.mark.parametrize("students", [("tiny_cnn", "tiny_mobilenet"), ("resnet18", "mobilenet_v2")])
def test_graphed_steps_equal_eager_steps(students):
    """Losses per step, weights, BatchNorm statistics and the lr after 12 steps (one short batch among them)."""
    eager, graphed = _train("off", CUDA, students), _train("on", CUDA, students)
    de, dg = eager[2], graphed[2]
    assert dg.graphed is not None and dg.graphed.replays >= 7 and dg.graphed.eager_fallbacks == 1
    _assert_same_training(eager, graphed, rel=2e-2, abs_=1e-3)
    assert de.lr() == pytest.approx(dg.lr())
    # the last replay ran at the scheduler's lr of that step (set before it; the scheduler steps after it)
    lrs = [float(t) for t in dg.graphed._lrs[0]]
    assert lrs == pytest.approx([dg.lr_before_last_step] * len(lrs)) and dg.lr_before_last_step != dg.lr()


@pytest.mark.gpu
@pytest.mark.slow
def test_compiled_students_inside_the_graph_equal_compiled_eager_steps():
    """--compile max-autotune-no-cudagraphs with --cuda-graphs on: Inductor's kernels replayed from one graph."""
    students = ("resnet18", "mobilenet_v2")
    eager = _train("off", CUDA, students, compile="max-autotune-no-cudagraphs")
    graphed = _train("on", CUDA, students, compile="max-autotune-no-cudagraphs")
    assert graphed[2].graphed is not None and graphed[2].graphed.replays >= 7
    _assert_same_training(eager, graphed, rel=2e-2, abs_=1e-3)


@pytest.mark.slow
def test_a_compiled_step_equals_the_eager_step_on_the_cpu():
    """--compile default on the CPU (Inductor's C++ kernels): the same losses and weights as eager steps (without
    dropout: Inductor draws its own masks, from the same per-step seed)."""
    students = ("tiny_cnn", "tiny_mobilenet")
    eager = _train("off", CPU, students, steps=3, dropout=0.0)
    compiled = _train("off", CPU, students, steps=3, dropout=0.0, compile="default")
    assert all(hasattr(m, "_orig_mod") for m in compiled[2].forward)  # really compiled
    _assert_same_training(eager, compiled, rel=1e-4, abs_=5e-6)


@pytest.mark.gpu
def test_load_state_dict_recaptures():
    d = _distiller("on", CUDA)
    batches = _batches(6, CUDA)
    for x, y, t in batches[:5]:
        d.step(x, y, t)
    assert d.graphed.graph is not None
    d.load_state_dict(d.state_dict())
    assert d.graphed.graph is None and d.graphed.calls == 0


@pytest.fixture(scope="module")
def tiny_shards(shared_shards):
    return shared_shards(wnids=["n02869837", "n01749939"], train_per_class=8, val_per_class=2, size=(32, 40),
                         shard_size=8)


def _train_cli(shards, out, *extra):
    from click.testing import CliRunner

    from trainer.cli import main

    return CliRunner().invoke(main, ["train", "--shards", str(shards), "--out", str(out), "--mode", "hard",
                                     "--students", "tiny_cnn", "--epochs", "1", "--image-size", "24",
                                     "--batch-size", "8", "--num-workers", "1", *extra])


def test_cli_records_what_ran_and_refuses_graphs_on_the_cpu(tiny_shards, tmp_path):
    import json

    res = _train_cli(tiny_shards, tmp_path / "run")
    assert res.exit_code == 0, res.output
    runtime = json.loads((tmp_path / "run" / "config.json").read_text())["runtime"]
    assert (runtime["cuda_graphs"], runtime["decode_device"], runtime["prefetch"]) == (False, "cpu", 0)
    res = _train_cli(tiny_shards, tmp_path / "run2", "--cuda-graphs", "on")
    assert res.exit_code == 2 and "Traceback" not in res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--cuda-graphs on: the device is cpu" in lines[0]
    assert not (tmp_path / "run2" / "config.json").exists()  # refused before anything was written


@pytest.mark.gpu
def test_the_demo_teachers_graphed_step_equals_its_eager_step():
    """trainer/jobs/teacher_recipe.py's step (label smoothing, its own optimizer) under a CUDA graph: same sums, weights."""
    from trainer.jobs.teacher_recipe import _step

    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    out = []
    for graphs in (False, True):
        torch.manual_seed(0)
        model = build_model("tiny_resnet", 5).to(CUDA, memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, fused=True)
        step = _step(model, opt, None, CUDA, torch.bfloat16, 0.1)
        if graphs:
            from trainer.engine.graphed import GraphedStep

            step = GraphedStep(step, [opt], CUDA)
        sums = [step(x, y).tolist() for x, y, _ in _batches(8, CUDA)[:6]]
        out.append((sums, {k: v.float().cpu() for k, v in model.state_dict().items()}))
    (se, we), (sg, wg) = out
    assert se == pytest.approx(sg, rel=2e-2, abs=1e-3)
    assert all(torch.allclose(a, wg[k], rtol=2e-2, atol=2e-3) for k, a in we.items())
