"""Tables, ratios and target checks of the peer benchmark (``python -m sae.bench.peers``).

Reads the results dict that :func:`sae.bench.peers.run` assembles and renders it as Markdown:
the main table (speed, memory, held-out quality per system and architecture, ratios ours/peer),
the scaling table (TopK step time against width, next to the encoder matmul) and the issue's
targets, each with its measured value and whether it is met.
"""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

from sae.bench.common import markdown_table

PEERS = ("saelens", "sparsify")


def machine_info() -> dict[str, Any]:
    """CPU, cores, load average and torch version at the time of the run."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "load_avg": list(os.getloadavg()), "torch": torch.__version__,
            "python": platform.python_version()}


def _ok(rows: list[dict[str, Any]], system: str, arch: str = "topk") -> dict[str, Any] | None:
    return next((r for r in rows if r["system"] == system and r["arch"] == arch and r["status"] == "ok"), None)


def _check(name: str, value: float | None, threshold: float, higher_is_better: bool, detail: str) -> dict[str, Any]:
    met = None if value is None else (value >= threshold if higher_is_better else value <= threshold)
    return {"target": name, "value": value, "threshold": threshold, "met": met, "detail": detail}


def targets(results: dict[str, Any], expansion: int, system: str = "ours") -> list[dict[str, Any]]:
    """The issue's targets for ``system``'s TopK row: speed at the main width and at 64x (from
    the scaling table's ``ours``), peak memory, FVU within 2% of the best peer, dead fraction no
    higher than the best peer's."""
    rows = results["main"]
    ours = _ok(rows, system)
    peers = [r for r in (_ok(rows, p) for p in PEERS) if r is not None]
    out = []
    fastest = max(peers, key=lambda r: r["tokens_per_s"], default=None)
    out.append(_check(f"tokens/s >= 1.5x the faster peer at {expansion}x", ours["tokens_per_s"] / fastest[
        "tokens_per_s"] if ours and fastest else None, 1.5, True, f"faster peer: {fastest['system']}" if fastest else
        "no peer measured"))
    wide = next((s for s in results["scaling"] if s["expansion"] == 64), None)
    if wide is not None:
        o = wide["systems"].get(system, {})
        ps = [wide["systems"][p] for p in PEERS if wide["systems"].get(p, {}).get("status") == "ok"]
        f = max(ps, key=lambda r: r["tokens_per_s"], default=None)
        out.append(_check("tokens/s >= 3x the faster peer at 64x", o["tokens_per_s"] / f["tokens_per_s"]
                          if f and o.get("status") == "ok" else None, 3.0, True,
                          f"faster peer: {f['system']}" if f else "no peer measured"))
    lean = min(peers, key=lambda r: r["peak_rss_mib"], default=None)
    out.append(_check(f"peak RSS <= the leaner peer at {expansion}x (ratio ours/peer)", ours["peak_rss_mib"] / lean[
        "peak_rss_mib"] if ours and lean else None, 1.0, False, f"leaner peer: {lean['system']}" if lean else ""))
    best = min(peers, key=lambda r: r["fvu"], default=None)
    out.append(_check("held-out FVU <= 1.02x the best peer's (ratio ours/peer)", ours["fvu"] / best["fvu"]
                      if ours and best else None, 1.02, False,
                      f"best peer: {best['system']} (L0 ours {ours['l0']:.1f}, peer {best['l0']:.1f})"
                      if ours and best else ""))
    spliced = [r for r in peers if "ce_loss_recovered" in r]
    if ours and "ce_loss_recovered" in ours and spliced:  # a causal LM with --splice-contexts
        top = max(spliced, key=lambda r: r["ce_loss_recovered"])
        out.append(_check("CE loss recovered >= the best peer's (ours - peer)", ours["ce_loss_recovered"] -
                          top["ce_loss_recovered"], 0.0, True, f"best peer: {top['system']} "
                          f"({top['ce_loss_recovered']:.4f}; KL ours {ours['kl_div_sae']:.4g}, peer "
                          f"{top['kl_div_sae']:.4g})"))
    sparsify = _ok(rows, "sparsify")
    out.append(_check("tokens/s >= 2x sparsify's", ours["tokens_per_s"] / sparsify["tokens_per_s"]
                      if ours and sparsify else None, 2.0, True, "sparsify's TopK"))
    least = min(peers, key=lambda r: r["dead_fraction"], default=None)
    out.append(_check("held-out dead fraction <= the best peer's (ours - peer)", ours["dead_fraction"] -
                      least["dead_fraction"] if ours and least else None, 0.0, False,
                      f"best peer: {least['system']} ({least['dead_fraction']:.4f})" if least else ""))
    return out


def _ratio(a: float | None, b: float | None) -> float | str:
    return a / b if a is not None and b else "-"


def main_table(rows: list[dict[str, Any]]) -> str:
    spliced = any("ce_loss_recovered" in r for r in rows)
    headers = ["system", "arch", "FVU", "L0", "dead frac"] + (["CE recovered", "KL"] if spliced else []) + [
        "step ms", "fastest step ms", "tokens/s", "peak RSS MiB", "RSS growth MiB", "ours/peer step time",
        "ours/peer peak RSS"]
    body = []
    for r in rows:
        if r["status"] != "ok":
            continue
        ours = _ok(rows, "ours", r["arch"]) if r["system"] != "ours" else None
        body.append([r["system"], r["arch"], r["fvu"], r["l0"], r["dead_fraction"]]
                    + ([r.get("ce_loss_recovered", "-"), r.get("kl_div_sae", "-")] if spliced else [])
                    + [1e3 * r["median_step_s"],
                     1e3 * min(r["step_seconds"], default=float("nan")), r["tokens_per_s"], r["peak_rss_mib"],
                     r["peak_rss_mib"] - r["rss_start_mib"],
                     _ratio(ours and ours["median_step_s"], r["median_step_s"]) if ours else "-",
                     _ratio(ours and ours["peak_rss_mib"], r["peak_rss_mib"]) if ours else "-"])
    return markdown_table(headers, body)


def scaling_table(scaling: list[dict[str, Any]], systems: list[str]) -> str:
    headers = ["latents", "x@W_enc ms"] + [f"{s} step ms" for s in systems] + [f"{s} peak MiB" for s in systems]
    headers += ["ours speed-up vs faster peer", "ours step / matmul"]
    body = []
    for e in scaling:
        res = {s: e["systems"].get(s, {}) for s in systems}
        ok = {s: r for s, r in res.items() if r.get("status") == "ok"}
        peer_best = min((ok[p]["median_step_s"] for p in PEERS if p in ok), default=None)
        ours = ok.get("ours")
        body.append([f"{e['num_latents']} ({e['expansion']}x)", e["matmul_ms"]]
                    + [1e3 * ok[s]["median_step_s"] if s in ok else res[s].get("status", "-") for s in systems]
                    + [ok[s]["peak_rss_mib"] if s in ok else "-" for s in systems]
                    + [_ratio(peer_best, ours and ours["median_step_s"]),
                       _ratio(ours and 1e3 * ours["median_step_s"], e["matmul_ms"])])
    return markdown_table(headers, body)


def _not_ok(results: dict[str, Any]) -> list[str]:
    rows = list(results["main"]) + [r for e in results["scaling"] for r in e["systems"].values()]
    seen, out = set(), []
    for r in rows:
        if r["status"] != "ok" and (r["system"], r["status"]) not in seen:
            seen.add((r["system"], r["status"]))
            out.append(f"- {r['system']} ({r['arch']}, {r['num_latents']} latents): {r['status']}: {r['reason']}")
    return out


def render(results: dict[str, Any]) -> str:
    """The Markdown report: setup, main table, scaling table, targets, skipped or failed runs."""
    s, m, info = results["setup"], results["machine"], results["data"]
    libs = sorted({r["library"] for r in results["main"] if r["status"] == "ok"})
    lines = [
        "# Peer benchmark: sae-forge vs SAELens vs sparsify (CPU)",
        "",
        f"Activations: {info.get('model', '?')} `{info.get('hookpoint', '?')}` over {info.get('corpus', '?')}, "
        f"d={s['d']}; {results['train_tokens']} training tokens ({results['steps']} steps of {s['batch']}, "
        f"{results['epochs']:.2f} epochs over {info.get('train_rows', '?')} unique rows), "
        f"{info.get('heldout_rows', '?')} held-out tokens (every {info.get('heldout_every', '?')}th context).",
        f"Shared: k={s['k']}, Adam lr={s['lr']:g}, linear warm-up {s['warmup_steps']} steps then linear decay to 0, "
        f"AuxK weight {s['auxk_alpha']:g}, dead after {s['dead_tokens']} tokens, JumpReLU L0 coefficient "
        f"{s['l0_coefficient']:g} (FVU units), {s['threads']} threads per process; step time = median period of "
        f"each library's own training loop after {s['timing_warmup']} warm-up steps.",
        f"Machine: {m['cpu']}, {m['cores']} cores, 1-min load average {m.get('load_avg_start', float('nan')):.2f} at "
        f"the start and {m['load_avg'][0]:.2f} at the end, torch "
        f"{m['torch']}; libraries: {', '.join(libs)}.",
        "",
        "## Training at the main width, evaluated on held-out activations by one evaluator",
        "",
        main_table(results["main"]),
    ]
    spliced = next((r for r in results["main"] if "splice_tokens" in r), None)
    if spliced:
        lines += ["", f"CE recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean) and KL (clean || spliced) of the "
                      f"model with each SAE in place of its hook point, on {spliced['splice_tokens']} tokens of "
                      f"held-out contexts (CE clean {spliced['ce_loss_clean']:.4f}, zero-ablated "
                      f"{spliced['ce_loss_zero']:.4f})."]
    if results["scaling"]:
        systems = list(results["scaling"][0]["systems"])
        lines += ["", f"## Scaling: TopK step time against width (k={s['k']}, batch {s['batch']})", "",
                  scaling_table(results["scaling"], systems)]
    for system, checks in results["targets"].items():
        lines += ["", f"## Targets ({system}, TopK)", ""]
        for t in checks:
            state = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
            value = "-" if t["value"] is None else f"{t['value']:.3g}"
            lines.append(f"- {t['target']}: {value} (target {t['threshold']:g}) **{state}**; {t['detail']}")
    problems = _not_ok(results)
    if problems:
        lines += ["", "## Not run", ""] + problems
    notes = sorted({n for r in results["main"] if r["status"] == "ok" for n in r.get("notes", [])})
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"
