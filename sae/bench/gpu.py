"""The GPU benchmark: kernel correctness on the device and the TopK training step against its floor.

    python -m sae.bench.gpu [--out runs/bench_gpu] [--quick] [--profile] [--steps 20]

On a CUDA machine (about 3 minutes on an H100/H200), in one run:

1. kernel correctness against fp64 dense references (values and gradients, fp32 and bf16, odd
   shapes, duplicate and hot latents, up to B=4096 x L=36864 x D=2304 x K=64), bitwise-repeatable
   backward, and the fused optimiser step against the unfused sequence (:mod:`.gpu_checks`);
2. the device's copy bandwidth, and per shape (B=4096; d, latents, k = 768, 24576, 32 /
   2304, 36864, 64 / 4096, 131072, 64) the bf16 and fp32 encoder GEMM, the floor
   ``bf16 GEMM + 32 bytes/parameter / bandwidth``, and one row per configuration of ours (the
   trainer's real ``train_step`` after the data init) and sparsify's TopK loop when ``sparsify``
   imports: ms/step, tokens/s, step/floor, speed-up over sparsify, peak memory (:mod:`.gpu_step`);
3. with ``--profile``, the CUDA kernels our default step spends its time in;
4. with ``--feed`` (:mod:`.gpu_feed`), whether the data keeps up: harvest against the bare forward,
   training from a bf16 buffer against training from device memory (and the reader's GB/s into
   the device), and training while harvesting against training from the buffer.

Prints one markdown table and writes ``gpu_bench.json`` to ``--out``. Without a GPU it runs the
same code on the CPU at small shapes (a smoke run; figures are not GPU figures).
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from . import gpu_checks, gpu_step
from .common import guarded


def device_info(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(name=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                    sms=p.multi_processor_count)
    else:
        info["name"] = platform.processor() or "cpu"
    return info


def profile_default_step(shapes, device: torch.device, top: int = 14, log=print) -> dict:
    """Top CUDA kernels (ms per step) of the default configuration, 5 profiled steps per shape (device
    kernels only; their sum is the device's busy time per step)."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for d, L, k in shapes:
        x = gpu_step.activations(d, 4096, device)
        name = "ours (defaults)"
        sae_kw, train_kw = gpu_step.OURS[name]
        import tempfile

        from sae.buffer.source import Batch
        from sae.models import SAEConfig, build_sae
        from sae.train.config import TrainConfig
        from sae.train.trainer import Trainer

        sae = build_sae(SAEConfig(num_latents=L, k=k), d, seed=0)
        with tempfile.TemporaryDirectory() as tmp:
            tr = Trainer(TrainConfig(batch_size=4096, steps=10**9, device=str(device), progress=False, out_dir=tmp,
                                     eval_every=0, final_report=False), {"topk": sae}, gpu_step._FixedSource(x))
            batch = Batch(x)
            tr.init_from_data(batch)
            for _ in range(5):
                tr.train_step(batch)
            gpu_step.sync(device)
            n = 5
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(n):
                    tr.train_step(batch)
                gpu_step.sync(device)
        rows = []
        for e in prof.key_averages():
            # Kernels only: a CPU op (aten::addmm, an autograd Function) also carries the device time
            # of the kernels it launched, which would count them twice.
            if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
                continue
            t = getattr(e, "self_device_time_total", None)
            if t is None:
                t = getattr(e, "self_cuda_time_total", 0)
            if t > 0:
                rows.append((e.key[:90], t / 1e3 / n, e.count // n))
        rows.sort(key=lambda r: -r[1])
        busy = sum(r[1] for r in rows)
        log(f"\nprofile d={d} L={L} k={k}: GPU kernel time {busy:.2f} ms/step")
        for key, ms, cnt in rows[:top]:
            log(f"  {ms:8.3f} ms  x{cnt:<3d} {key}")
        out[f"{d}x{L}x{k}"] = {"gpu_busy_ms": busy, "kernels": rows[:40]}
        del tr, sae, x
        gpu_step.free(device)
    return out


def autotuned_configs() -> dict[str, str]:
    """The tile configurations the autotuned kernels chose, per key."""
    try:
        from sae_kernels import triton_fused as F
    except ImportError:
        return {}
    tuners = {"scatter_pair": F._scatter_pair_tuned, **{f"decode_error K<={k}": t for k, t in F._decode_tuned.items()}}
    return {f"{name} {key}": str(cfg) for name, t in tuners.items() if t is not None
            for key, cfg in getattr(t, "cache", {}).items()}


def table(rows: list[dict], bandwidth: float) -> str:
    head = ("| d x latents, k | configuration | ms/step | tokens/s | step / floor | ours / sparsify tokens/s | "
            "peak GiB |")
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        shape = f"{r['d']} x {r['L']}, {r['k']}"
        for name, v in r["variants"].items():
            if "ms" not in v:
                lines.append(f"| {shape} | {name} | {v.get('error') or v.get('skipped')} | | | | |")
                continue
            star = " (fastest)" if name == r.get("fastest") else ""
            sp = f"{v['speedup_vs_sparsify']:.2f}" if "speedup_vs_sparsify" in v and name != "sparsify" else "-"
            lines.append(f"| {shape} | {name}{star} | {v['ms']:.2f} | {v['tokens_per_s']:,.0f} | "
                         f"{v['step_over_floor']:.2f} | {sp} | {v['peak_gib']:.2f} |")
        lines.append(f"| {shape} | floor: bf16 GEMM {r['gemm_bf16_ms']:.2f} ms (fp32 {r['gemm_fp32_ms']:.2f}) + "
                     f"32 B x {r['params'] / 1e6:.0f}M params / {bandwidth / 1e12:.2f} TB/s | {r['floor_ms']:.2f} | | "
                     "1.00 | | |")
    return "\n".join(lines)


def targets(result: dict) -> list[str]:
    """The issue targets this run can judge, one line each: figure, target, met or not."""
    lines = []
    step = result.get("step") or []
    for i, r in enumerate(step):
        v = r["variants"].get("ours (defaults)", {})
        shape = f"{r['d']} x {r['L']}, k={r['k']}"
        if "speedup_vs_sparsify" in v:
            x = v["speedup_vs_sparsify"]
            lines.append(f"{shape}: ours (defaults) / sparsify tokens/s = {x:.2f} (target >= 2.0: "
                         f"{'met' if x >= 2.0 else 'NOT met'})")
        if "step_over_floor" in v and i >= len(step) - 2 and len(step) == 3:
            x = v["step_over_floor"]
            lines.append(f"{shape}: ours (defaults) step / floor = {x:.2f} (target <= 2.5: "
                         f"{'met' if x <= 2.5 else 'NOT met'})")
    feed = result.get("feed") or {}
    for part, key, goal, what in (("harvest", "ratio", 0.85, "harvest / bare forward"),
                                  ("buffer", "ratio", 0.9, "training from a buffer / from memory")):
        if key in feed.get(part, {}):
            x = feed[part][key]
            lines.append(f"{what} = {x:.2f} (target >= {goal}: {'met' if x >= goal else 'NOT met'})")
    if "identical" in feed.get("harvest_exact", {}):
        e = feed["harvest_exact"]
        lines.append(f"pipelined harvest writes the synchronous harvest's bytes: {'yes' if e['identical'] else 'NO'}; "
                     f"harvester rows equal a plain forward's: {'yes' if e['rows_vs_reference']['equal'] else 'NO'}")
    if "ratio" in feed.get("live", {}):
        lines.append(f"live / buffer training tokens/s = {feed['live']['ratio']:.2f} (reported, no target)")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench_gpu")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small kernel cases only")
    p.add_argument("--no-checks", action="store_true", help="skip the kernel correctness section")
    p.add_argument("--profile", action="store_true", help="also profile the default step's kernels")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--shapes", default="", help="d,latents,k;... (default: the three GPU shapes, or tiny on CPU)")
    p.add_argument("--configs", default="", help="comma-separated row names of ours (default: all)")
    p.add_argument("--feed", action="store_true", help="also measure harvest, buffer and live feeding")
    p.add_argument("--no-step", action="store_true", help="skip the training-step table")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    info = device_info(device)
    print("device:", info, flush=True)
    if a.profile and device.type == "cuda":
        # CUPTI must be set up before any CUDA graph is captured, or profiling replays later can fail.
        try:
            from torch.profiler._utils import _init_for_cuda_graphs

            _init_for_cuda_graphs()
        except (ImportError, RuntimeError) as e:
            print(f"profiler: could not set CUPTI up before graph capture ({e}); profiles may lack replays")
    result: dict = {"info": info}

    def log(msg: str) -> None:
        print(msg, flush=True)

    if not a.no_checks:
        log("\n== kernel correctness (fp64 dense references)")
        result["checks"] = gpu_checks.run_checks(device, quick=a.quick or device.type != "cuda", log=log)
    bandwidth = gpu_step.copy_bandwidth(device, 2**30 if device.type == "cuda" else 2**26)
    result["copy_bandwidth_bytes_per_s"] = bandwidth
    log(f"\ncopy bandwidth: {bandwidth / 1e9:,.0f} GB/s")
    if a.shapes:
        shapes = [tuple(int(v) for v in s.split(",")) for s in a.shapes.split(";")]
    else:
        shapes = gpu_step.SHAPES if device.type == "cuda" else gpu_step.CPU_SHAPES
    ours = [n for n in gpu_step.OURS if not a.configs or n in a.configs.split(",")] or list(gpu_step.OURS)
    rows = []
    if not a.no_step:
        log("\n== training step (B=4096)")
    for d, L, k in [] if a.no_step else shapes:
        rows.append(gpu_step.measure_shape(d, L, k, 4096, device, bandwidth, steps=a.steps, warmup=a.warmup,
                                           ours=ours, log=log))
        (out / "gpu_bench.json").write_text(json.dumps({**result, "step": rows}, indent=1))
    result["step"] = rows
    result["autotuned"] = autotuned_configs()
    (out / "gpu_bench.json").write_text(json.dumps(result, indent=1))
    if "checks" in result:
        bad = [r["case"] + " " + r["dtype"] for r in result["checks"] if not r["ok"]]
        log(f"\nkernel checks: {len(result['checks']) - len(bad)} passed, {len(bad)} failed {bad if bad else ''}")
    log(f"\n{info.get('name')} ({info['device']}), torch {info['torch']}, triton {info['triton']}; "
        f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; ms/step = mean of {a.steps} consecutive steps after "
        f"{a.warmup} warm-up steps\n")
    if rows:  # printed before the optional parts, so that a failure there cannot lose it
        log(table(rows, bandwidth))
    if a.feed:
        from .gpu_feed import run_feed

        log("\n== feeding the device")
        result["feed"] = run_feed(device, log=log)
        (out / "gpu_bench.json").write_text(json.dumps(result, indent=1))
    if a.profile and device.type == "cuda":
        guarded(result, "profile", lambda: profile_default_step(shapes, device, log=log), log)
    result["autotuned"] = autotuned_configs()
    (out / "gpu_bench.json").write_text(json.dumps(result, indent=1))
    goals = targets(result)
    if goals:
        log("\ntargets (issues 12 and 13):\n  " + "\n  ".join(goals))
    log(f"\nwrote {out / 'gpu_bench.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
