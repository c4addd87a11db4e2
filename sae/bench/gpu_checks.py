"""Correctness of the sparse kernels on the device, against fp64 dense references.

Part of ``python -m sae.bench.gpu``. Every case builds random inputs on the device, runs the op
through the autograd Functions with the device's backend (Triton on CUDA), and compares values
and gradients with the dense reference evaluated in fp64: relative error ``||a - r|| / ||r||``.
Cases cover odd shapes, duplicate indices in a row, a hot latent chosen by every token, and the
sizes of real SAEs (up to B=4096, L=36864, D=2304, K=64). Also checked: the fused optimiser step
against the unfused sequence, and that a repeated backward gives bitwise equal gradients.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from sae_kernels import gather_encode, sparse_decode
from sae_kernels.autoencode import reference_autoencode, sparse_autoencode
from sae_kernels.sparse_decode import reference_decode
from sae_kernels.sparse_encode import reference_gather_encode

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


@dataclasses.dataclass(frozen=True)
class Case:
    B: int
    K: int
    L: int
    D: int
    duplicates: bool = False
    hot: bool = False

    @property
    def name(self) -> str:
        extra = "".join((" dup" if self.duplicates else "", " hot" if self.hot else ""))
        return f"B={self.B} K={self.K} L={self.L} D={self.D}{extra}"


CASES = [
    Case(1, 1, 5, 8), Case(4, 3, 12, 37), Case(20, 2, 7, 5, hot=True), Case(3, 4, 6, 9, duplicates=True),
    Case(777, 17, 1000, 129, duplicates=True), Case(4096, 32, 24576, 768),
    Case(4096, 64, 36864, 2304), Case(2048, 64, 65536, 1024, hot=True),
]
SMALL_CASES = CASES[:5]


def rel(a: torch.Tensor, r: torch.Tensor) -> float:
    a, r = a.detach().double(), r.detach().double()
    return float((a - r).norm() / r.norm().clamp_min(1e-30))


def _inputs(c: Case, dtype: torch.dtype, device: torch.device):
    g = torch.Generator(device=device).manual_seed(c.B * 7 + c.K)
    idx = torch.randint(0, c.L, (c.B, c.K), device=device, generator=g)
    if c.duplicates and c.K > 1:
        idx[:, -1] = idx[:, 0]
    if c.hot:
        idx[:, 0] = 3
    x = torch.randn(c.B, c.D, device=device, generator=g)
    W_enc = torch.randn(c.L, c.D, device=device, generator=g) / c.D**0.5
    b_enc = torch.randn(c.L, device=device, generator=g) * 0.1
    W_dec = torch.randn(c.L, c.D, device=device, generator=g) / c.D**0.5
    b_dec = torch.randn(c.D, device=device, generator=g) * 0.1
    y = torch.randn(c.B, c.D, device=device, generator=g)
    return idx, [t.to(dtype) for t in (x, W_enc, b_enc, W_dec, b_dec, y)]


def check_decode_encode(c: Case, dtype: torch.dtype, device: torch.device) -> dict[str, float]:
    """Relative errors of sparse_decode (out, g_vals, g_W) and gather_encode (g_x, g_W, g_b)."""
    idx, (x, W_enc, b_enc, W_dec, _, y) = _inputs(c, dtype, device)
    vals = torch.randn(c.B, c.K, device=device, dtype=torch.float32).to(dtype).requires_grad_()
    W = W_dec.clone().requires_grad_()
    out = sparse_decode(idx, vals, W)
    out.backward(y)
    v64, W64 = vals.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    ref = reference_decode(idx, v64, W64)
    ref.backward(y.double())
    errs = {"decode": rel(out, ref), "decode g_vals": rel(vals.grad, v64.grad), "decode g_W": rel(W.grad, W64.grad)}
    del out, ref, W64, v64
    xs, We, be = (t.clone().requires_grad_() for t in (x, W_enc, b_enc))
    with torch.no_grad():
        pre = (x.float() @ W_enc.float().T + b_enc.float()).gather(1, idx).to(dtype)
    gv = torch.randn(c.B, c.K, device=device).to(dtype)
    gather_encode(xs, We, be, idx, pre).backward(gv)
    x64, We64, be64 = (t.detach().double().requires_grad_() for t in (xs, We, be))
    reference_gather_encode(x64, We64, be64, idx).backward(gv.double())
    errs.update({"encode g_x": rel(xs.grad, x64.grad), "encode g_W": rel(We.grad, We64.grad),
                 "encode g_b": rel(be.grad, be64.grad)})
    return errs


def check_autoencode(c: Case, dtype: torch.dtype, device: torch.device) -> dict[str, float]:
    """Relative errors of the fused sparse_autoencode (x_hat, err, 5 gradients) and whether a second
    backward gives bitwise equal weight gradients."""
    idx, (x, W_enc, b_enc, W_dec, b_dec, y) = _inputs(c, dtype, device)
    leaves = [t.clone().requires_grad_() for t in (W_enc, b_enc, W_dec, b_dec)]

    def run(ws):
        We, be, Wd, bd = ws
        with torch.no_grad():
            pre = ((x.float() - bd.float()) @ We.float().T + be.float()).gather(1, idx).to(dtype)
        return sparse_autoencode(x, idx, pre, We, be, Wd, bd, b_pre_D=bd, y_BE=y)

    vals, x_hat, err = run(leaves)
    (err + 0.5 * x_hat.sum()).backward()
    grads = [p.grad.clone() for p in leaves]
    for p in leaves:
        p.grad = None
    _, x_hat2, err2 = run(leaves)
    (err2 + 0.5 * x_hat2.sum()).backward()
    deterministic = all(torch.equal(a, p.grad) for a, p in zip(grads, leaves))
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    We, be, Wd, bd = ref_leaves
    _, rx, rerr = reference_autoencode(x.double(), idx, We, be, Wd, bd, b_pre_D=bd, y_BE=y.double())
    (rerr + 0.5 * rx.sum()).backward()
    names = ("g_W_enc", "g_b_enc", "g_W_dec", "g_b_dec")
    errs = {"autoencode x_hat": rel(x_hat, rx),
            "autoencode err": abs(float(err.detach()) - float(rerr.detach())) / abs(float(rerr.detach()))}
    errs.update({f"autoencode {n}": rel(g, r.grad) for n, g, r in zip(names, grads, ref_leaves)})
    errs["bitwise repeat"] = 0.0 if deterministic else 1.0
    return errs


def check_fused_adam(device: torch.device, L: int = 4096, D: int = 768, steps: int = 3) -> dict[str, float]:
    """SAEAdam against the unfused sequence (project, clip, torch Adam, renorm): for each parameter,
    the relative error of its update over ``steps`` steps, ``||du_fused - du|| / ||du||``.

    (Element-wise bounds are the CPU tests' business, at small shapes: over millions of elements a
    few gradients near 0 make Adam's ``m / sqrt(v)`` sensitive to the last bit of either side.)
    """
    from sae.models import SAEConfig, build_sae
    from sae.train.config import TrainConfig
    from sae.train.schedule import build_optimizer

    torch.manual_seed(0)
    cfg = TrainConfig(grad_clip=0.5)
    fused = build_sae(SAEConfig(num_latents=L, k=32), D, seed=0).to(device)
    plain = build_sae(SAEConfig(num_latents=L, k=32), D, seed=0).to(device)
    start = {n: p.detach().clone() for n, p in plain.named_parameters()}
    opt_f = build_optimizer(fused, 1e-3, cfg, fused_step=True)
    opt_p = build_optimizer(plain, 1e-3, cfg, fused_step=False)
    for _ in range(steps):
        for pf, pp in zip(fused.parameters(), plain.parameters()):
            g = torch.randn_like(pf)
            pf.grad, pp.grad = g.clone(), g.clone()
        opt_f.step()
        plain.remove_parallel_grad_()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), cfg.grad_clip)
        opt_p.step()
        plain.normalize_decoder_()
    return {f"update {n}": rel(pf.detach() - start[n], pp.detach() - start[n])
            for (n, pf), pp in zip(fused.named_parameters(), plain.parameters())}


def check_topk(device: torch.device) -> dict[str, float]:
    """The radix-select top-k against torch.topk: same multiset of values, values at their indices,
    including rows full of ties. Returns 0.0 per case when equal, 1.0 when not."""
    from sae_kernels.topk_select import topk

    out = {}
    for B, L, k, ties in ((4096, 24576, 32, False), (4096, 36864, 64, False), (512, 131072, 64, False),
                          (300, 5000, 64, True), (7, 1000, 1000, False)):
        g = torch.Generator(device=device).manual_seed(L)
        s = torch.randn(B, L, device=device, generator=g).to(torch.bfloat16)
        if ties:
            s = ((s * 2).round() / 2).to(torch.bfloat16)
        v, i = topk(s, k)
        rv = s.topk(k, dim=1).values
        ok = torch.equal(v.float().sort(1).values, rv.float().sort(1).values) and torch.equal(s.gather(1, i), v)
        out[f"topk B={B} L={L} k={k}{' ties' if ties else ''}"] = 0.0 if ok else 1.0
    return out


def check_graph_vs_eager(device: torch.device, steps: int = 8) -> dict[str, float]:
    """Trainer steps replayed from a CUDA graph against the same steps run eagerly: max relative
    difference of the parameters (0 when bitwise equal), and whether the graph was used."""
    import tempfile

    from sae.buffer.source import Batch
    from sae.models import SAEConfig, build_sae
    from sae.train.config import TrainConfig
    from sae.train.trainer import Trainer

    from .gpu_step import _FixedSource, activations

    x = activations(512, 1024, device)
    params, used = {}, {}
    for graphs in (False, True):
        sae = build_sae(SAEConfig(num_latents=8192, k=32), 512, seed=0)
        with tempfile.TemporaryDirectory() as tmp:
            cfg = TrainConfig(batch_size=1024, steps=10**6, device=str(device), progress=False, out_dir=tmp,
                              eval_every=0, final_report=False, cuda_graphs=graphs, log_every=3)
            tr = Trainer(cfg, {"topk": sae}, _FixedSource(x))
            tr.init_from_data(Batch(x))
            for _ in range(steps):
                tr.train_step(Batch(x))
            params[graphs] = {n: p.detach().clone() for n, p in tr.saes["topk"].named_parameters()}
            used[graphs] = "topk" in tr.graphed.graphs and tr.graphed.graphs["topk"].captured
            why = tr.graphed.off.get("topk")
    out = {f"graph vs eager {n}": rel(params[True][n], params[False][n]) for n in params[True]}
    out["graph used"] = 1.0 if used[True] else 0.0
    if why:
        out["graph off: " + why[:200]] = 1.0
    return out


def check_families_vs_cpu(device: torch.device, steps: int = 3) -> dict[str, float]:
    """The newer families (sparse-backward JumpReLU, Gated, Matryoshka BatchTopK, cross-layer
    transcoders) trained a few exact-mode steps on ``device`` against the same steps on the CPU:
    max relative difference of the parameters (data init included)."""
    import tempfile

    from sae.models import SAEConfig, build_sae
    from sae.train.config import TrainConfig
    from sae.train.trainer import Trainer

    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g) @ torch.randn(64, 64, generator=g) / 8
    y = torch.cat([x[:, :32].tanh(), x[:, 32:] @ torch.randn(32, 32, generator=g) / 6], 1)
    cases = {"jumprelu": (SAEConfig(architecture="jumprelu", num_latents=512, k=16, l0_coefficient=1e-3), x),
             "gated": (SAEConfig(architecture="gated", num_latents=512), x),
             "matryoshka_batchtopk": (SAEConfig(architecture="matryoshka_batchtopk", num_latents=512, k=16), x),
             "clt topk": (SAEConfig(architecture="clt", clt_layers=2, num_latents=128, k=8, transcode=True), (x, y)),
             "clt jumprelu": (SAEConfig(architecture="clt", clt_layers=2, clt_activation="jumprelu", num_latents=128,
                                        k=8, transcode=True), (x, y))}
    out = {}
    for name, (cfg, data) in cases.items():
        params = {}
        for dev in ("cpu", str(device)):
            sae = build_sae(cfg, 64, 64, seed=0)
            with tempfile.TemporaryDirectory() as tmp:
                tc = TrainConfig(batch_size=256, steps=steps, device=dev, progress=False, out_dir=tmp, lr=1e-3,
                                 lr_warmup_steps=0, deterministic=True, final_report=False, eval_every=0)
                tr = Trainer(tc, {"s": sae}, data)
                tr.fit()
                params[dev] = {n: p.detach().cpu() for n, p in tr.saes["s"].named_parameters()}
        here, ref = params[str(device)], params["cpu"]
        out[f"{name} on {device.type} vs cpu"] = max(rel(here[n], ref[n]) for n in ref)
    return out


def check_use_on_device(device: torch.device) -> dict[str, float]:
    """Attribution and steering (``sae.use``) with a tiny random GPT-2 and an SAE on ``device`` (and
    attribution with the SAE left on the CPU), against the same on the CPU: the relative difference
    of the attributions (same latents), the model's logit, and whether greedy steered generation
    gives the same text (reported; a near-tie on a random model may flip a token: not judged)."""
    import tempfile

    from sae.eval.lm import load_eval_model
    from sae.harvest.config import ModelConfig
    from sae.harvest.tiny import save_tiny_model
    from sae.models import SAEConfig, build_sae
    from sae.use.attribute import attribute
    from sae.use.steer import Intervention, steer_prompts

    prompt = "Return the value of the object"
    got = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_tiny_model(Path(tmp) / "gpt2", "gpt2", layers=2, hidden=64)
        for dev in ("cpu", str(device)):
            lm, _ = load_eval_model(ModelConfig(name=str(folder), device=dev), "causal_lm")
            # fp32 selection on both devices: "auto" would select in bf16 on a GPU, fp32 on this CPU.
            sae = build_sae(SAEConfig(num_latents=512, k=8, selection_dtype="float32"), 64, seed=0).to(dev)
            a = attribute(lm.model, lm.tokenizer, sae, "layers.0", prompt, " object")
            rows = steer_prompts(lm.model, lm.tokenizer, sae, "layers.0", [prompt],
                                 [Intervention(int(max(a.totals, key=lambda i: abs(a.totals[i]))), "add",
                                               coefficient=20.0)], max_new_tokens=6)
            got[dev] = (a, rows[0]["steered"])
            if dev != "cpu":  # the README's case: a model on the GPU, an SAE loaded onto the CPU
                got["mixed"] = (attribute(lm.model, lm.tokenizer, sae.cpu(), "layers.0", prompt, " object"), None)
    (ref, ref_text), (here, text) = got["cpu"], got[str(device)]
    mixed = got.get("mixed", (here,))[0]
    scale = max(abs(v) for v in ref.totals.values())
    diff = max(abs(t.totals.get(i, 0.0) - v) for t in (here, mixed) for i, v in ref.totals.items()) / scale
    same = set(ref.totals) == set(here.totals) == set(mixed.totals)
    return {"attribution rel diff": diff, "same latents": float(same),
            "logit rel diff": abs(here.logit - ref.logit) / max(abs(ref.logit), 1e-6),
            "same steered text (not judged)": float(text == ref_text)}


def run_checks(device: torch.device, *, quick: bool = False, log=print) -> list[dict]:
    """All cases for fp32 and bf16; returns one record per (case, dtype) with errors and PASS/FAIL.

    A check that raises is one FAIL row carrying the error; the rest still run (and the benchmark
    goes on to the step table)."""
    rows: list[dict] = []

    def record(case: str, dtype: str, run, judge, worst_of=lambda errs: max(errs.values(), default=0.0)):
        try:
            errs = run()
            ok, worst = bool(judge(errs)), float(worst_of(errs))
        except Exception as e:  # noqa: BLE001
            errs, ok, worst = {"error": f"{type(e).__name__}: {e}"[:300]}, False, None  # JSON has no NaN
        rows.append({"case": case, "dtype": dtype, "ok": ok, "worst": worst, **errs})
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return errs, ok

    def kernel_errs(c, dtype):
        return {**check_decode_encode(c, dtype, device), **check_autoencode(c, dtype, device)}

    for dtype in (torch.float32, torch.bfloat16):
        tol = TOL[dtype]
        for c in SMALL_CASES if quick else CASES:
            errs, ok = record(
                c.name, str(dtype).removeprefix("torch."), lambda c=c, dtype=dtype: kernel_errs(c, dtype),
                lambda e, tol=tol: all(v <= tol for k, v in e.items() if k != "bitwise repeat")
                and e["bitwise repeat"] == 0,
                lambda e: max((v for k, v in e.items() if k != "bitwise repeat"), default=0.0))
            if "error" in errs:
                log(f"FAIL {rows[-1]['dtype']:8s} {c.name:32s} {errs['error']}")
            else:
                log(f"{'PASS' if ok else 'FAIL'} {rows[-1]['dtype']:8s} {c.name:32s} worst rel err "
                    f"{rows[-1]['worst']:.1e}  bitwise repeat: {errs['bitwise repeat'] == 0}")
    errs, ok = record("SAEAdam vs unfused sequence (L=4096, D=768, 3 steps)", "float32",
                      lambda: check_fused_adam(device), lambda e: max(e.values()) <= 1e-5)
    log(f"{'PASS' if ok else 'FAIL'} fused optimiser step vs unfused: {errs}")
    if device.type == "cuda":
        errs, ok = record("radix-select top-k vs torch.topk", "bfloat16", lambda: check_topk(device),
                          lambda e: max(e.values()) == 0)
        log(f"{'PASS' if ok else 'FAIL'} top-k vs torch.topk: {errs}")
    errs, ok = record("newer families: 3 exact steps vs the CPU", "float32", lambda: check_families_vs_cpu(device),
                      lambda e: max(e.values()) <= 1e-3)
    log(f"{'PASS' if ok else 'FAIL'} newer families vs CPU: {errs}")
    errs, ok = record("attribution and steering vs the CPU (tiny GPT-2)", "float32",
                      lambda: check_use_on_device(device),
                      lambda e: e["same latents"] == 1.0 and e["attribution rel diff"] <= 1e-3
                      and e["logit rel diff"] <= 1e-4, lambda e: e["attribution rel diff"])
    log(f"{'PASS' if ok else 'FAIL'} sae.use on {device.type} vs CPU: {errs}")
    if device.type == "cuda":
        def graph_worst(e):
            return max(v for k, v in e.items() if k.startswith("graph vs eager"))

        errs, ok = record("CUDA graph replay vs eager fused steps (8 steps)", "float32",
                          lambda: check_graph_vs_eager(device),
                          lambda e: e["graph used"] == 1.0 and graph_worst(e) <= 1e-5, graph_worst)
        log(f"{'PASS' if ok else 'FAIL'} CUDA graph vs eager: {errs}")
    return rows
