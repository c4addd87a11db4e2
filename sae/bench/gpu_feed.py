"""Keeping the device fed: harvest against the bare forward, buffer and live training against memory.

Part of ``python -m sae.bench.gpu --feed``; on a CPU the same code runs at toy sizes (a smoke run).

1. Harvest: ``harvest_to_buffer`` (tokenise, forward with hooks and early stop, device-to-host
   copies, row filtering, writer thread: serialisation, checksums, fsync) against the bare
   truncated forward of the same random Llama-style model on the same contexts plus a copy of
   the hidden state to the host; input tokens/s of each and their ratio (target >= 0.85 on a GPU).
2. Buffer vs memory: the trainer's real steps on batches from a bfloat16 buffer on disk
   (``ShardReader`` + ``DeviceFeed``) against the same SAE on batches already on the device;
   tokens/s of each and the ratio (target >= 0.9 at 768 x 24576, k=32). Also the reader's rate
   into device memory (GB/s of activations).
   Also, on a small harvest, whether the pipelined path (depth 2) writes the same bytes as the
   synchronous one (depth 0) on this device, and whether the harvester's rows (its own stream,
   non-blocking copies) equal those of a plain forward read back with a blocking copy.
3. Live vs buffer: training while harvesting the model from (1) (``data=live``, the forward and
   the SAE step sharing the device) against training from the buffer (1) wrote.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from sae.buffer.config import DataConfig, LiveConfig, WriterConfig
from sae.buffer.device_feed import DeviceFeed
from sae.buffer.reader import ShardReader
from sae.buffer.tensor_source import TensorSource
from sae.buffer.writer import ShardWriter
from sae.harvest.config import HarvestConfig, ModelConfig, TextConfig
from sae.harvest.harvester import Chunk, Harvester
from sae.harvest.model import load_model
from sae.harvest.text import iter_batches, iter_contexts, load_text_dataset
from sae.harvest.tiny import save_tiny_model
from sae.models import SAEConfig, build_sae
from sae.runners.harvest import harvest_to_buffer
from sae.train.config import TrainConfig
from sae.train.trainer import Trainer

from .common import guarded, sync


def _sizes(device: torch.device) -> dict[str, int]:
    if device.type == "cuda":
        return {"layers": 8, "hidden": 2048, "vocab": 2048, "tokens": 400_000, "d": 768, "L": 24576, "k": 32,
                "rows": 2 ** 20, "steps": 60, "live_L": 16384}
    return {"layers": 2, "hidden": 64, "vocab": 512, "tokens": 20_000, "d": 64, "L": 1024, "k": 8,
            "rows": 2 ** 16, "steps": 12, "live_L": 512}


def harvest_vs_forward(device: torch.device, root: Path, s: dict[str, int]) -> dict:
    """(1): rows/s and input tokens/s of the harvest, and of the bare forward + host copy."""
    folder = save_tiny_model(root / "model", "llama", layers=s["layers"], hidden=s["hidden"], vocab_size=s["vocab"])
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    model_cfg = ModelConfig(name=str(folder), device=str(device), dtype=dtype)
    text, batch_size, depth = TextConfig(context_length=128), 64, s["layers"] // 2
    result = harvest_to_buffer(model_cfg, text, HarvestConfig(batch_size=batch_size, max_tokens=s["tokens"],
                                                              progress=False),
                               WriterConfig(out_dir=str(root / "buf"), dtype="bfloat16",
                                            shard_tokens=min(65536, s["tokens"] // 8)),
                               [f"layers.{depth}"])
    contexts = result.manifest["shards"][-1]["last_context"] + 1
    lm = load_model(model_cfg)
    layers = lm.model.layers if hasattr(lm.model, "layers") else lm.model.model.layers
    batches = list(iter_batches((c for c in iter_contexts(load_text_dataset(text), lm.tokenizer, text)
                                 if c.index < contexts), batch_size, lm.tokenizer.pad_token_id or 0))
    n_input = sum(int(b.attention_mask.sum()) for b in batches)
    base = lm.model.model if hasattr(lm.model, "model") else lm.model
    base.layers = layers[:depth + 1]
    with torch.inference_mode():
        base(input_ids=batches[0].input_ids.to(device))  # warm-up
        sync(device)
        t = time.perf_counter()
        for b in batches:
            h = base(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device)).last_hidden_state
            h[b.attention_mask.to(device).bool()].to("cpu")
        sync(device)
        bare = time.perf_counter() - t
    out = {"input_tokens": n_input, "rows": result.new_tokens, "harvest_s": result.seconds, "bare_s": bare,
           "harvest_tok_s": n_input / result.seconds, "bare_tok_s": n_input / bare, "ratio": bare / result.seconds,
           "hookpoint": f"layers.{depth}",
           "model": f"random Llama, {s['layers']} layers, hidden {s['hidden']}, {dtype}"}
    del lm, base
    return out


def harvest_exact(device: torch.device, root: Path, s: dict[str, int]) -> dict:
    """(1b): the pipelined harvest's shards against the synchronous harvest's, byte for byte."""
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    model_cfg = ModelConfig(name=str(root / "model"), device=str(device), dtype=dtype)
    files = {}
    for depth in (0, 2):
        out = root / f"exact_{depth}"
        harvest_to_buffer(model_cfg, TextConfig(context_length=128),
                          HarvestConfig(batch_size=16, max_tokens=s["tokens"] // 10, progress=False,
                                        pipeline_depth=depth),
                          WriterConfig(out_dir=str(out), dtype="bfloat16", shard_tokens=4096),
                          [f"layers.{s['layers'] // 2}"])
        files[depth] = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
                        if p.is_file() and p.name != "cli.log"}
    differ = sorted(n for n in files[0].keys() | files[2].keys() if files[0].get(n) != files[2].get(n))
    return {"identical": not differ, "files": len(files[0]), "differ": differ[:5],
            "rows_vs_reference": rows_vs_reference(model_cfg, f"layers.{s['layers'] // 2}")}


def rows_vs_reference(model_cfg: ModelConfig, hookpoint: str, n_batches: int = 8) -> dict:
    """The harvester's rows (on CUDA: its own stream, pinned non-blocking copies, rows picked by
    host-computed indices) against a plain reference from the same forward (default stream, rows
    read at their (context, position) after a blocking copy): byte-equal or not."""
    text = TextConfig(context_length=128)
    lm = load_model(model_cfg)
    harvester = Harvester(lm, [hookpoint], text, HarvestConfig(batch_size=16, progress=False))
    contexts = iter_contexts(load_text_dataset(text), lm.tokenizer, text)
    equal, rows = True, 0
    for _, batch in zip(range(n_batches), iter_batches(contexts, 16, harvester.pad_id)):
        chunk = harvester.harvest(batch)
        full = harvester.capture(batch.input_ids, batch.attention_mask)[harvester.names[0]].cpu()
        where = {int(c): i for i, c in enumerate(batch.index)}
        ref = full[torch.tensor([where[int(c)] for c in chunk.contexts]), chunk.positions.long()]
        got = chunk.acts[harvester.names[0]]
        equal &= got.shape == ref.shape and got.dtype == ref.dtype and torch.equal(
            got.contiguous().view(torch.uint8), ref.contiguous().view(torch.uint8))  # bytes
        rows += len(chunk)
    return {"equal": bool(equal), "rows": rows}


def _tokens_per_s(trainer: Trainer, steps: int, warm: int = 10) -> float:
    """Tokens/s of ``trainer.fit()`` over its steps after ``warm`` (data init, compilation, capture)."""
    marks: dict[int, float] = {}

    def mark(t: Trainer) -> None:
        if t.step in (warm, steps):
            sync(t.device)
            marks[t.step] = time.perf_counter()

    trainer.step_hooks.append(mark)
    trainer.fit()
    return trainer.cfg.batch_size * (steps - warm) / (marks[steps] - marks[warm])


def _trainer(source, d: int, L: int, k: int, steps: int, device: torch.device, out: Path) -> Trainer:
    cfg = TrainConfig(batch_size=4096, steps=steps, device=str(device), progress=False, out_dir=str(out), eval_every=0,
                      final_report=False, checkpoint_every=0)
    return Trainer(cfg, {"topk": build_sae(SAEConfig(num_latents=L, k=k), d, seed=0)}, source)


def buffer_vs_memory(device: torch.device, root: Path, s: dict[str, int]) -> dict:
    """(2): training tokens/s from a bf16 buffer against from device memory; reader GB/s to the device."""
    d, rows = s["d"], s["rows"]
    g = torch.Generator().manual_seed(0)
    shard = min(65536, rows // 8)
    w = ShardWriter(root / "rand", {"hookpoints": {"x": {"d": d}}, "hookpoint_order": ["x"]}, shard, "bfloat16")
    for start in range(0, rows, shard):
        n = torch.arange(start, start + shard)
        w.append(Chunk({"x": torch.randn(shard, d, generator=g).to(torch.bfloat16)}, n.int(), n.int(), n))
    w.finish()
    reader = ShardReader(root / "rand", 4096, heldout_shards=1)
    t, moved = time.perf_counter(), 0
    for batch, _, _ in DeviceFeed(reader, device, 2):
        moved += batch.x.numel() * batch.x.element_size()
        if moved > 2 ** 30:
            break
    sync(device)
    read_gb_s = moved / (time.perf_counter() - t) / 1e9
    memory = torch.randn(16 * 4096, d, generator=g).to(device)
    steps = s["steps"]
    from_buffer = _tokens_per_s(_trainer(ShardReader(root / "rand", 4096, heldout_shards=1), d, s["L"], s["k"],
                                         steps, device, root / "t_buf"), steps)
    from_memory = _tokens_per_s(_trainer(TensorSource(memory, batch_size=4096), d, s["L"], s["k"], steps, device,
                                         root / "t_mem"), steps)
    return {"d": d, "L": s["L"], "k": s["k"], "buffer_tok_s": from_buffer, "memory_tok_s": from_memory,
            "ratio": from_buffer / from_memory, "reader_to_device_gb_s": read_gb_s,
            "into": "device memory" if device.type == "cuda" else "host memory (no GPU)"}


def live_vs_buffer(device: torch.device, root: Path, s: dict[str, int], hookpoint: str) -> dict:
    """(3): training while harvesting the model of (1), against training from its buffer."""
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    live = LiveConfig(model=ModelConfig(name=str(root / "model"), device=str(device), dtype=dtype),
                      text=TextConfig(context_length=128), harvest=HarvestConfig(batch_size=64, progress=False))
    data = DataConfig(source="live", hookpoint=hookpoint, live=live, normalize="none")
    from sae.runners.train import build_source

    steps, d = s["steps"], s["hidden"]

    def peak() -> float:  # GiB the caching allocator reserved (the model's stream and the step's pool apart)
        return torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else float("nan")

    def reset_peak() -> None:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)

    reset_peak()
    live_rate = _tokens_per_s(_trainer(build_source(data, 4096), d, s["live_L"], s["k"], steps, device,
                                       root / "t_live"), steps)
    live_peak = peak()
    reset_peak()
    buf_rate = _tokens_per_s(_trainer(ShardReader(root / "buf", 4096, heldout_shards=1, epochs=0), d, s["live_L"],
                                      s["k"], steps, device, root / "t_buf2"), steps)
    return {"d": d, "L": s["live_L"], "k": s["k"], "live_tok_s": live_rate, "buffer_tok_s": buf_rate,
            "ratio": live_rate / buf_rate, "live_peak_reserved_gib": live_peak, "buffer_peak_reserved_gib": peak()}


def run_feed(device: torch.device, log=print) -> dict:
    """All three, in a scratch folder. A part that fails is reported (``{"error": ...}``) and the
    others still run; (3) needs the model and buffer of (1)."""
    s = _sizes(device)
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        h = guarded(out, "harvest", lambda: harvest_vs_forward(device, root, s), log)
        if h:
            log(f"harvest ({h['model']}, hook {h['hookpoint']}): {h['harvest_tok_s']:,.0f} input tok/s vs bare "
                f"forward + host copy {h['bare_tok_s']:,.0f}: ratio {h['ratio']:.2f}")
            e = guarded(out, "harvest_exact", lambda: harvest_exact(device, root, s), log)
            if e:
                r = e["rows_vs_reference"]
                log(f"pipelined harvest vs synchronous on {device.type}: {e['files']} files, "
                    f"{'byte-identical' if e['identical'] else 'DIFFERENT: ' + ', '.join(e['differ'])}; the "
                    f"harvester's rows vs a plain forward + blocking copy: {r['rows']} rows, "
                    f"{'equal' if r['equal'] else 'DIFFERENT'}")
        b = guarded(out, "buffer", lambda: buffer_vs_memory(device, root, s), log)
        if b:
            log(f"training {b['d']} x {b['L']}, k={b['k']}: from a bf16 buffer {b['buffer_tok_s']:,.0f} tok/s, "
                f"from memory {b['memory_tok_s']:,.0f}: ratio {b['ratio']:.2f}; reader into {b['into']} "
                f"{b['reader_to_device_gb_s']:.2f} GB/s")
        if not h:
            out["live"] = {"skipped": "needs the model and buffer of the harvest part, which failed"}
            return out
        v = guarded(out, "live", lambda: live_vs_buffer(device, root, s, h["hookpoint"]), log)
        if v:
            log(f"training {v['d']} x {v['L']}, k={v['k']} live (harvesting as it trains): {v['live_tok_s']:,.0f} "
                f"tok/s, from the buffer: {v['buffer_tok_s']:,.0f}: ratio {v['ratio']:.2f}; GPU memory reserved "
                f"{v['live_peak_reserved_gib']:.2f} vs {v['buffer_peak_reserved_gib']:.2f} GiB")
    return out

