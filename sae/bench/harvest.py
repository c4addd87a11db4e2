"""Harvest and buffer benchmark (not a test): what the harvester and the reader cost.

    python -m sae.bench.harvest [--quick] [--hookpoint layers.3] [--json out.json]

Prints, in one run, on the packaged MiniLM over the built-in corpus:

(a) harvest input tokens/s (tokenise, forward with hooks and early stop, drop special tokens,
    write checksummed shards with fsync, manifest per shard) against the bare model truncated
    to the same depth (``encoder.layer[:N+1]``, no hooks, pre-tokenised batches) on the same
    contexts; ratio = harvest / bare, overhead = 1 - ratio (target <= 15%). Runs alternate and the
    best of each is kept (on a shared machine a neighbour only ever slows a run down).
(b) reader GB/s of activations for shards already in the page cache (one epoch of shuffled
    batches of 4096 through ``ShardReader``: mmap, xxh3 checksums, gather, prefetch thread)
    against a plain read of the same files into a fresh tensor each (``readinto``); ratio =
    reader / plain (target >= 0.7). Also shown: the reader without checksums, and a plain read
    into one reused buffer (no page faults: an upper bound no batch-producing reader reaches).
(c) peak memory of a harvest of ``--memory-tokens`` rows (default 1M) in a fresh process: peak
    RSS (VmHWM) and RSS after 10%, 50% and 90% of the rows; flat and under 2 GiB is the target.
(d) the reader into the training device (``ShardReader`` + ``DeviceFeed``: pinned staging and a
    copy stream on a GPU), GB/s of bf16 activations; on a machine without a GPU, into host memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from sae.bench.common import markdown_table
from sae.buffer.config import WriterConfig
from sae.buffer.reader import ShardReader
from sae.harvest.config import HarvestConfig, ModelConfig, TextConfig
from sae.harvest.hookpoints import resolve_hookpoints
from sae.harvest.model import load_model
from sae.harvest.text import iter_batches, iter_contexts, load_text_dataset
from sae.runners.harvest import harvest_to_buffer


def bench_harvest(hookpoint: str, contexts: int, batch_size: int, repeats: int) -> dict[str, float]:
    """(a): pipeline vs bare truncated forward over the first ``contexts`` contexts."""
    text = TextConfig()
    lm = load_model(ModelConfig(device="cpu"))
    (hp,) = resolve_hookpoints(lm.model, [hookpoint])
    depth = int(hp.module.split(".")[2]) + 1 if hp.module.startswith("encoder.layer.") else None
    if depth is None:
        raise ValueError(f"--hookpoint {hookpoint!r}: the bare baseline needs a MiniLM block (layers.N...)")
    ds = load_text_dataset(text)
    batches = list(iter_batches((c for c in iter_contexts(ds, lm.tokenizer, text) if c.index < contexts),
                                batch_size, lm.tokenizer.pad_token_id))
    n_input = int(sum(int(b.attention_mask.sum()) for b in batches))
    bare = lm.model
    layers = bare.encoder.layer
    rows = 0

    def run_bare() -> float:
        bare.encoder.layer = layers[:depth]
        try:
            t0 = time.perf_counter()
            with torch.inference_mode():
                for b in batches:
                    bare(input_ids=b.input_ids, attention_mask=b.attention_mask)
            return time.perf_counter() - t0
        finally:
            bare.encoder.layer = layers

    def run_harvest(depth: int | None = None) -> float:
        nonlocal rows
        cfg = HarvestConfig(batch_size=batch_size, max_tokens=budget, progress=False)
        if depth is not None:
            cfg.pipeline_depth = depth
        with tempfile.TemporaryDirectory() as tmp:
            # The row budget that the first ``contexts`` contexts yield (specials dropped).
            result = harvest_to_buffer(ModelConfig(device="cpu"), text, cfg,
                                       WriterConfig(out_dir=tmp, shard_tokens=16384), [hookpoint])
            rows = result.new_tokens
            return result.seconds

    specials = {lm.tokenizer.cls_token_id, lm.tokenizer.sep_token_id, lm.tokenizer.pad_token_id}
    budget = int(sum(int((b.attention_mask.bool() & ~torch.isin(b.input_ids, torch.tensor(sorted(specials))))
                         .sum()) for b in batches))
    run_bare()  # warm-up of both paths (oneDNN primitive caches, corpus, imports)
    run_harvest()
    times_bare, times_harvest, times_sync = [], [], []
    for _ in range(repeats):
        times_bare.append(run_bare())
        times_harvest.append(run_harvest())
        times_sync.append(run_harvest(0))
    # Best of alternating runs: a noisy neighbour only ever slows a run down.
    tb, th, ts = min(times_bare), min(times_harvest), min(times_sync)
    return {"input_tokens": n_input, "rows": rows, "bare_tok_s": n_input / tb, "harvest_tok_s": n_input / th,
            "harvest_rows_s": rows / th, "ratio": tb / th, "overhead": 1 - tb / th,
            "sync_tok_s": n_input / ts, "sync_overhead": 1 - tb / ts}


def bench_to_device(shards: int, shard_tokens: int, d: int, batch_size: int, dtype: str = "bfloat16") -> dict:
    """(d): ShardReader + DeviceFeed into the training device (a GPU when there is one: pinned staging,
    copy stream), GB/s of activations as stored; one epoch after a warm-up epoch."""
    from sae.buffer.device_feed import DeviceFeed
    from sae.buffer.writer import ShardWriter
    from sae.harvest.harvester import Chunk

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        w = ShardWriter(tmp, {"hookpoints": {"x": {"d": d}}, "hookpoint_order": ["x"]}, shard_tokens, dtype)
        n = torch.arange(shard_tokens)
        for _ in range(shards):
            w.append(Chunk({"x": torch.randn(shard_tokens, d)}, n.int(), n.int(), n))
        w.finish()

        def epoch() -> float:
            moved, t0 = 0, time.perf_counter()
            for batch, _, _ in DeviceFeed(ShardReader(tmp, batch_size, heldout_shards=0, epochs=1), device, 2):
                moved += batch.x.numel() * batch.x.element_size()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return moved / (time.perf_counter() - t0) / 1e9

        epoch()
        return {"device": str(device), "dtype": dtype, "gb_s": epoch()}


def bench_reader(shards: int, shard_tokens: int, d: int, batch_size: int, repeats: int) -> dict[str, float]:
    """(b): ShardReader vs plain reads, page cache warm, alternating runs (best of each)."""
    from sae.buffer.writer import ShardWriter
    from sae.harvest.harvester import Chunk

    with tempfile.TemporaryDirectory() as tmp:
        w = ShardWriter(tmp, {"hookpoints": {"x": {"d": d}}, "hookpoint_order": ["x"]}, shard_tokens, "float32")
        n = torch.arange(shard_tokens)
        for _ in range(shards):
            w.append(Chunk({"x": torch.randn(shard_tokens, d)}, n.int(), n.int(), n))
        manifest = w.finish()
        files = [Path(tmp) / s["files"]["x"]["path"] for s in manifest["shards"]]
        sizes = [f.stat().st_size for f in files]
        act_bytes = shards * shard_tokens * d * 4
        pre = torch.empty(max(sizes), dtype=torch.uint8)

        def plain(prealloc: bool) -> float:
            t0 = time.perf_counter()
            for f, size in zip(files, sizes):
                buf = pre if prealloc else torch.empty(size, dtype=torch.uint8)
                with f.open("rb", buffering=0) as fh:
                    fh.readinto(buf.numpy()[:size])
            return sum(sizes) / (time.perf_counter() - t0) / 1e9

        def reader(verify: str) -> float:
            t0 = time.perf_counter()
            for _ in ShardReader(tmp, batch_size, heldout_shards=0, mixing_shards=4, epochs=1, verify=verify):
                pass
            return act_bytes / (time.perf_counter() - t0) / 1e9

        plain(False)  # page cache warm
        runs: dict[str, list[float]] = {"plain": [], "plain_prealloc": [], "reader": [], "reader_noverify": []}
        for _ in range(repeats):
            runs["plain"].append(plain(False))
            runs["reader"].append(reader("lazy"))
            runs["plain_prealloc"].append(plain(True))
            runs["reader_noverify"].append(reader("none"))
        med = {k: max(v) for k, v in runs.items()}
        return {"gb": act_bytes / 1e9, **{f"{k}_gb_s": v for k, v in med.items()},
                "ratio": med["reader"] / med["plain"], "ratio_noverify": med["reader_noverify"] / med["plain"]}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def memory_child(tokens: int, hookpoint: str) -> None:
    """(c), run in a fresh process: harvest ``tokens`` rows, sample RSS against rows written."""
    from sae.harvest.corpus import python_docs_dataset

    with tempfile.TemporaryDirectory() as tmp:
        texts = python_docs_dataset()["text"]
        docs = Path(tmp) / "docs.jsonl"
        with docs.open("w") as fh:  # enough passes over the corpus for the budget (~0.57M rows per pass)
            for p in range(tokens // 500_000 + 1):
                fh.writelines(json.dumps({"text": f"[{p}] {t}"}) + "\n" for t in texts)
        out = Path(tmp) / "buf"
        samples: list[tuple[int, int]] = []
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.5):
                try:
                    written = json.loads((out / "manifest.json").read_text())["tokens"]
                except (OSError, ValueError):
                    written = 0
                samples.append((written, _rss_kib("VmRSS")))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        result = harvest_to_buffer(ModelConfig(device="cpu"), TextConfig(name=str(docs)),
                                   HarvestConfig(max_tokens=tokens, progress=False),
                                   WriterConfig(out_dir=str(out)), [hookpoint])
        done.set()
        sampler.join()
        at = {f"rss_mib_at_{int(q * 100)}pct": next((r for w, r in samples if w >= q * tokens), samples[-1][1]) / 1024
              for q in (0.1, 0.5, 0.9)}
        print(json.dumps({"tokens": result.manifest["tokens"], "seconds": time.perf_counter() - t0,
                          "peak_rss_mib": _rss_kib("VmHWM") / 1024, **at}))


def bench_memory(tokens: int, hookpoint: str) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-m", "sae.bench.harvest", "--memory-child", str(tokens),
                           "--hookpoint", hookpoint], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller runs (about a minute on 2 cores)")
    p.add_argument("--hookpoint", default="layers.3")
    p.add_argument("--batch-size", type=int, default=64, help="contexts per forward")
    p.add_argument("--memory-tokens", type=int, default=0, help="rows of the memory run (default 1M, quick 200k)")
    p.add_argument("--memory-child", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the figures to this file")
    a = p.parse_args(argv)
    if a.memory_child:
        memory_child(a.memory_child, a.hookpoint)
        return
    memory_tokens = a.memory_tokens or (200_000 if a.quick else 1_000_000)
    print(f"MiniLM at {a.hookpoint}, built-in corpus, context 128, batch {a.batch_size}, "
          f"threads={torch.get_num_threads()}")
    mem = bench_memory(memory_tokens, a.hookpoint)
    h = bench_harvest(a.hookpoint, 192 if a.quick else 384, a.batch_size, 3 if a.quick else 5)
    r = bench_reader(4 if a.quick else 8, 32768 if a.quick else 65536, 384, 4096, 3 if a.quick else 5)
    print("\n(a) harvest vs bare forward to the same depth (input tokens/s; best of alternating runs)")
    print(markdown_table(["input tokens", "bare tok/s", "harvest tok/s", "harvest rows/s", "ratio", "overhead",
                          "synchronous harvest tok/s (pipeline_depth=0)", "its overhead"],
                         [[h["input_tokens"], h["bare_tok_s"], h["harvest_tok_s"], h["harvest_rows_s"], h["ratio"],
                           f"{100 * h['overhead']:.1f}%", h["sync_tok_s"], f"{100 * h['sync_overhead']:.1f}%"]]))
    print("\n(b) reader (batches of 4096, shuffled) vs plain read, shards in page cache (GB/s; best of "
          "alternating runs)")
    print(markdown_table(["GB", "plain read", "plain (reused buffer)", "reader (checksums)", "reader (no checksums)",
                          "ratio", "ratio (no checksums)"],
                         [[r["gb"], r["plain_gb_s"], r["plain_prealloc_gb_s"], r["reader_gb_s"],
                           r["reader_noverify_gb_s"], r["ratio"], r["ratio_noverify"]]]))
    print(f"\n(c) memory of a {mem['tokens']}-row harvest ({mem['seconds']:.0f}s, fresh process)")
    print(markdown_table(["peak RSS MiB", "RSS @10% MiB", "RSS @50% MiB", "RSS @90% MiB"],
                         [[mem["peak_rss_mib"], mem["rss_mib_at_10pct"], mem["rss_mib_at_50pct"],
                           mem["rss_mib_at_90pct"]]]))
    dev = bench_to_device(4 if a.quick else 8, 32768 if a.quick else 65536, 384, 4096)
    where = "device memory (GPU)" if dev["device"] != "cpu" else "host memory (no GPU here)"
    print(f"\n(d) reader into the training device: {dev['gb_s']:.2f} GB/s of {dev['dtype']} activations into {where}")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "harvest": h, "reader": r, "memory": mem,
                                            "to_device": dev}, indent=2))


if __name__ == "__main__":
    main()
