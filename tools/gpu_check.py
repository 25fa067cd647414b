"""One GPU check for the whole path, in a single short call (tools/gpu_check.sh runs it on the device).

Measures on one GPU in one process (tools/gpu_measure.py has one function per row), warm-up excluded:
  - decode + 224 training augmentation, torch backend: nvJPEG on the GPU vs CPU worker processes vs the GPU's
    hardware JPEG engines (nvImageCodec, when installed), and DALI when installed (its rate and its pixels against
    the torch backend's);
  - dual-student steps (ResNet-18 + MobileNetV2, bf16, channels_last) at batch 256 and 64, eager vs one CUDA graph,
    with cached logits (the ceiling) and with the online ResNet-50 teacher; the host's enqueue time beside each;
  - eager == graphed after N steps (losses, weights, BatchNorm statistics), and a few steps lower the loss;
  - cache-teacher at scale (20,000 images x 2 augmentation epochs) against decode and ResNet-50 inference;
  - the real training loop (`kdpipe train`) fed by the loader and the cache, per batch and decode device;
  - `--profile`: the top kernels and the host-vs-GPU split, eager vs graphed; `--compile MODE,...`: torch.compile;
  - the 50-epoch ImageNet-100 time at batch 64 and 256 against the paper's 12.36 h.
`--quick` runs the same code tiny on the CPU (a test runs it, so the script cannot rot between GPU runs).
Figures go to OUT/gpu_check.json (written after every stage); a table is printed last.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a bare checkout (PYTHONPATH=.)

from tools import gpu_measure as gm  # noqa: E402

STAGES = ("decode", "dali", "geometry", "equal", "loss_falls", "steps", "cache_teacher", "train_loop", "profile",
          "compile")


def run_stages(args, sizes: gm.Sizes, device: torch.device, results: dict, out: Path) -> None:
    cuda = device.type == "cuda"
    # nvJPEG on the SMs, CPU workers, and the GPU's hardware JPEG engines (nvImageCodec, which .whl/ carries): beside
    # the SMs, so decode can overlap the teacher's inference in cache-teacher (nvJPEG serialised them: 0.72 of the
    # lower rate) and the training step
    decoders = (("cuda", "cpu") + (("cuda-hw",) if gm.nvimgcodec_installed() else ())) if cuda else ("cpu",)
    wanted = set(args.only.split(",")) if args.only else set(STAGES) - {"compile"} - ({"profile"} if not args.profile
                                                                                       else set())
    if args.compile:
        wanted.add("compile")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        data = gm.make_data(work, sizes)
        results["data_seconds"] = time.perf_counter() - t0
        print(f"  data: {results['data_seconds']:.1f} s", flush=True)

        def per_decoder(fn) -> dict:
            """fn(decode_device) for each decoder; one that fails keeps its error, the others their figures."""
            out = {}
            for d in decoders:
                try:
                    out[d] = fn(d)
                except Exception as e:  # noqa: BLE001 - as for stages below
                    if args.quick:
                        raise
                    out[d] = {"error": f"{type(e).__name__}: {e}"}
            return out

        stages = [
            ("decode", lambda: per_decoder(lambda d: gm.bench_decode(data["big"], device, sizes, d,
                                                                     sizes.decode_epochs))),
            ("dali", lambda: gm.bench_dali(data["small"], device, sizes)),
            ("geometry", lambda: gm.check_geometry(data["small"], device, sizes)),
            ("equal", lambda: gm.check_graph_equal(sizes.classes, device, sizes)),
            ("loss_falls", lambda: gm.check_loss_falls(sizes.classes, device, sizes)),
            ("steps", lambda: gm.bench_steps(sizes.classes, device, sizes)),
            ("cache_teacher", lambda: per_decoder(lambda d: gm.bench_cache_teacher(data["big"], work, sizes.classes,
                                                                                   device, sizes, d))),
            # each decode device trains from the cache made with it (its fingerprint's decode_device)
            ("train_loop", lambda: [gm.bench_train_loop(data["big"], results["cache_teacher"][d]["cache"],
                                                        work, device, sizes, b, d, "auto")
                                    for b in sizes.batches for d in decoders if "cache" in results["cache_teacher"][d]]),
            ("profile", lambda: gm.profile_step(sizes.classes, device, sizes, min(sizes.batches))),
            ("compile", lambda: gm.bench_compile(sizes.classes, device, sizes, args.compile.split(","))),
        ]
        for key, fn in stages:
            if key not in wanted or (key == "train_loop" and "cache_teacher" not in results):
                continue
            t = time.perf_counter()
            try:
                results[key] = fn()
            except Exception as e:  # noqa: BLE001 - one failed row must not lose the others' figures
                if args.quick:
                    raise
                results[key] = {"error": f"{type(e).__name__}: {e}"}
            print(f"  {key}: {time.perf_counter() - t:.1f} s", flush=True)
            (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes on the CPU (a smoke test, not a measurement)")
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
    ap.add_argument("--only", default="", help=f"comma-separated stages ({','.join(STAGES)})")
    ap.add_argument("--profile", action="store_true", help="also the kernel profile (eager vs graphed)")
    ap.add_argument("--compile", default="", help="also torch.compile in these modes, e.g. reduce-overhead,"
                                                  "max-autotune-no-cudagraphs (minutes of compilation each; "
                                                  "default and max-autotune-no-cudagraphs also inside the graph)")
    args = ap.parse_args(argv)
    sizes = gm.QUICK if args.quick else gm.Sizes()
    device = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    if not args.quick and device.type != "cuda":
        raise SystemExit("no CUDA GPU here: run with --quick for the CPU smoke test")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})"
    print(f"gpu_check on {name}; torch {torch.__version__}; {os.cpu_count()} cores; quick={args.quick}", flush=True)
    results: dict = {"device": name, "torch": torch.__version__, "cores": os.cpu_count(), "quick": args.quick,
                     "sizes": sizes.__dict__}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    run_stages(args, sizes, device, results, out)
    results["estimate"] = estimates(results)
    results["total_seconds"] = time.perf_counter() - t0
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    print_table(results)
    return results


def estimates(r: dict) -> dict:
    """50-epoch ImageNet-100 time per batch from the real loop's best row (else the step ceiling)."""
    out = {}
    for row in r.get("train_loop", []) if isinstance(r.get("train_loop"), list) else []:
        b = str(row["batch"])
        if b not in out or row["images_per_s"] > out[b]["images_per_s"]:
            out[b] = {**gm.estimate(row["images_per_s"]), "from": f"train loop, decode {row['decode_device']}"}
    return out


def _f(x, fmt: str = "8.0f") -> str:
    return format(x, fmt) if isinstance(x, (int, float)) else f"{'-':>8}"


def print_table(r: dict) -> None:
    print(f"\n== gpu_check on {r['device']}, {r['cores']} cores "
          f"({'QUICK CPU smoke test, not a measurement' if r['quick'] else 'measured'}) ==")
    for d, row in (r.get("decode") or {}).items():
        if "images_per_s" in row:
            print(f"decode+augment, torch backend, decode {d:<7} {row['images_per_s']:8.0f} img/s "
                  f"(batch {row['batch']}, {row['workers']} workers)")
    dali = r.get("dali") or {}
    print(f"DALI: {dali.get('skipped') or dali.get('error') or ''}" if "images_per_s" not in dali else
          f"decode+augment, DALI {dali['images_per_s']:8.0f} img/s; vs torch pixels: same ids {dali['same_ids']}, "
          f"MAD {dali['mean_abs_diff_grey_levels']:.2f} grey levels")
    for b, s in (r.get("steps") or {}).items():
        if not isinstance(s, dict) or "cached_eager_images_per_s" not in s:
            continue
        print(f"batch {b:>4} step (img/s; host enqueue ms): cached eager {_f(s['cached_eager_images_per_s'])} "
              f"({s['cached_eager_host_ms']:.1f}) | graphs {_f(s.get('cached_graphs_images_per_s'))} "
              f"({_f(s.get('cached_graphs_host_ms'), '.1f')}) | online eager {_f(s['online_eager_images_per_s'])} "
              f"| graphs {_f(s.get('online_graphs_images_per_s'))}")
    for d, c in (r.get("cache_teacher") or {}).items():
        if "cache_teacher_images_per_s" in c:
            dec = (r.get("decode") or {}).get(d, {}).get("images_per_s")
            limit = min(dec or float("inf"), c["inference_images_per_s"])
            print(f"cache-teacher ({c['images']} views, decode {d}) {c['cache_teacher_images_per_s']:.0f} img/s vs "
                  f"decode {_f(dec, '.0f')}, inference {c['inference_images_per_s']:.0f}: "
                  f"{c['cache_teacher_images_per_s'] / limit:.2f} of the lower (target >= 0.8); steady "
                  f"{_f(c.get('steady_images_per_s'), '.0f')} img/s after {_f(c.get('fixed_seconds'), '.1f')} s fixed")
    for row in r.get("train_loop") or []:
        if isinstance(row, dict) and "images_per_s" in row:
            ceiling = (r.get("steps") or {}).get(str(row["batch"]), {}).get("cached_graphs_images_per_s")
            rel = f"{row['images_per_s'] / ceiling:.2f} of the graphed step" if ceiling else ""
            print(f"train loop b{row['batch']:<4} decode {row['decode_device']:<7}: {row['images_per_s']:7.0f} img/s, "
                  f"data {100 * (row['data_share'] or 0):.1f} % of step, {rel}")
    for b, e in (r.get("estimate") or {}).items():
        print(f"50 epochs of ImageNet-100 at batch {b}: {e['minutes_50_epochs']:.1f} min ({e['from']}), "
              f"{e['speedup_vs_paper']:.1f}x faster than the paper's {gm.PAPER_HOURS} h")
    p = r.get("profile") or {}
    for k in ("eager", "graphs"):
        if k in p:
            print(f"profile b{min(r['sizes']['batches'])} {k}: wall {p[k]['wall_ms']:.1f} ms, host enqueue "
                  f"{p[k]['host_enqueue_ms']:.1f} ms, GPU kernels {p[k]['gpu_kernels_ms']:.1f} ms "
                  f"(GPU busy {100 * p[k]['gpu_busy']:.0f} %)")
    for kern in p.get("top_kernels", [])[:8]:
        print(f"   {kern['ms_per_step']:6.2f} ms {100 * kern['share']:4.1f} %  {kern['name']}")
    for k, c in (r.get("compile") or {}).items():
        if isinstance(c, dict) and "images_per_s" in c:
            graphed = f", {c['graphs_images_per_s']:.0f} inside the step's graph" if "graphs_images_per_s" in c else ""
            print(f"torch.compile {k}: first step {c['first_step_s']:.0f} s, then {c['images_per_s']:.0f} img/s"
                  f"{graphed}")
    eq, lf, geo = r.get("equal") or {}, r.get("loss_falls") or {}, r.get("geometry") or {}
    hw = geo.get("hw") or {}
    hw_text = f"; hardware decode ok={hw.get('ok')} (MAD {_f(hw.get('mean_abs_diff_grey_levels'), '.2f')})" if hw else ""
    print(f"checks: geometry ok={geo.get('ok')} (MAD {_f(geo.get('mean_abs_diff_grey_levels'), '.2f')}{hw_text}), "
          f"loss falls ok={lf.get('ok')}, eager==graphs ok={eq.get('ok', eq.get('skipped'))} "
          f"(loss {_f(eq.get('max_rel_loss_diff'), '.1e')}, weights {_f(eq.get('max_rel_weight_diff'), '.1e')}, "
          f"BN {_f(eq.get('max_rel_bn_stat_diff'), '.1e')})")
    errors = {k: v["error"] for k, v in r.items() if isinstance(v, dict) and "error" in v}
    errors |= {f"{k}/{d}": v["error"] for k in ("decode", "cache_teacher") for d, v in (r.get(k) or {}).items()
               if isinstance(v, dict) and "error" in v}
    for k, v in errors.items():
        print(f"ERROR in {k}: {v}")
    print(f"total {r.get('total_seconds', 0):.0f} s")


if __name__ == "__main__":
    main()
