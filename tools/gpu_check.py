#!/usr/bin/env python
"""A prepared GPU check of vllm-coco at Llama-3-8B scale, with random weights (no hub, no vLLM).

Four parts, each timed and guarded on its own (one failure still reports the others):
  capture  tokens/s of the identify capture (`capture.capture`: q/k/v intensity hooks, rows streamed
           to disk) vs the plain decoder forward over the same batches, on a Llama-3-8B-shaped model
           in bfloat16, pooling over the last 8 of 512 tokens (a response, as identify does)
           -> capture_ratio; over the second half (the span earlier runs used) and all tokens
           -> capture_ratio_half_span, capture_ratio_full_span; the written rows equal the plain masked
           formula -> capture_check_pass
  gate     the NE gate of the Hugging Face reference (`edit.conditions` around every layer's
           attention, as `hf_reference.load_ne_model` installs it; ~1% of the packed q/k/v channels,
           random mu/sigma/w/W_hat) vs the same decoder without it -> ne_gate_ratio
  scoring  `scoring.coco_loss` on the GPU at the 8B neuron count (32 x (4096 + 1024 + 1024) =
           196,608 neurons, 1000 + 1000 rows of one category, K = 256), float64 and float32; the
           same formula on the CPU over a slice of neurons, projected to the full count; GPU float64
           equals CPU float64 on that slice -> scoring_gpu_s_per_category, scoring_parity_max_abs
  parity   prompt logprobs of a SmolLM2-135M-shaped Llama with SEEDED RANDOM weights (the real
           demo weights do not travel to the GPU machine) and the NE gate on, float32 on the CPU
           vs float32 on CUDA with TF32 off -> parity_max_abs_logprob (pass: <= 1e-3), greedy agreement

Needs only torch, transformers, numpy, safetensors and tqdm, and imports from vllm_coco only
modules free of vLLM / lm-eval (checked: the JSON's `heavy_imports` must be empty). On the device:

    PYTHONPATH=. python3 tools/gpu_check.py --out $OUT/gpu_check.json

Expected runtime on one H200: about 1 minute (budget: 8); measured 63 s wall, of which 55 s in the
parts (capture 28 s including the 11 s model build, gate 7 s, scoring 13 s, parity 5 s). Progress lines
are flushed as they come, so a cut-off run still says how far it got. `--dry-run` runs every part on
the CPU with tiny shapes in seconds (the tests do).
Output: a human table, then as the LAST line one JSON object (also written to --out).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo is not pip-installed there
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the hub; never wait for it

import numpy as np  # noqa: E402
import torch  # noqa: E402

from vllm_coco.core.models import layout_of  # noqa: E402
from vllm_coco.edit.conditions import NEEdit, install  # noqa: E402
from vllm_coco.identify import scoring  # noqa: E402
from vllm_coco.identify.capture import Span, _batches, _collate, capture, open_matrix  # noqa: E402

# What must not come in with vllm_coco's modules: none of it is installed on the GPU machine.
HEAVY = ("vllm", "lm_eval", "datasets", "matplotlib", "gguf")
HEAVY_IMPORTS = sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY))  # before transformers loads

LLAMA3_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=14336, vocab_size=128256, rope_theta=500000.0)
SMOLLM2_135M = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=1536, vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=256, rope_theta=10000.0, tie_word_embeddings=True)

# The run on the H200, and the same code path shrunk for the CPU (--dry-run).
FULL = dict(device="cuda", dtype=torch.bfloat16, model=LLAMA3_8B, batch=8, seq=512, response=8, batches=4, warmup=2,
            reps=5, pairs=1000, k=256, cpu_neurons=2048, chunk=1 << 28, ne_ratio=0.01,
            parity_model=SMOLLM2_135M, parity_name="SmolLM2-135M-shaped Llama", parity_prompts=8, parity_len=128,
            parity_ref=("cuda", torch.float32))
DRY = dict(device="cpu", dtype=torch.float32, model=TINY, batch=4, seq=32, response=8, batches=2, warmup=1, reps=3,
           pairs=20, k=8, cpu_neurons=64, chunk=20 * 8 * 7, ne_ratio=0.05,
           parity_model=TINY, parity_name="tiny Llama (dry run)", parity_prompts=4, parity_len=16,
           parity_ref=("cpu", torch.float64))  # no second device: compare float32 against float64
PARTS = ("capture", "gate", "scoring", "parity")
PARITY_TOL = 1e-3
ALPHA, BETA, LAM = 0.5, 2.0, 0.5  # NE gate strength; 1 + ALPHA*w*logistic(.) stays in [0.5, 1.5] for |w| <= 1


def say(msg: str) -> None:
    print(msg, flush=True)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def neuron_count(shape: dict) -> int:
    """q/k/v output channels of every layer: layers x (hidden + 2 x kv_heads x head_dim)."""
    head = shape["hidden_size"] // shape["num_attention_heads"]
    return shape["num_hidden_layers"] * (shape["hidden_size"] + 2 * shape["num_key_value_heads"] * head)


def build_llama(shape: dict, dtype, device: str, seed: int, std: float = 0.02):
    """A LlamaForCausalLM of this shape, created directly on `device` in `dtype` (no float32 detour),
    every matrix redrawn from N(0, std) by a seeded generator (norms stay 1): deterministic weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**shape, max_position_embeddings=4096)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):  # sorted: the draw order is fixed; tied weights once
            if p.ndim >= 2:
                p.normal_(0.0, std, generator=gen)
    return model.eval()


def random_gate(model, ratio: float, rng: np.random.Generator, device) -> list[dict]:
    """Per layer, NE gate tensors in the format `coco-tools ne` writes: ~ratio of the packed [q | k | v]
    width, drawn from the q and v channels as `ne_gate.select_ne` does, with random mu/sigma/w and a dense
    W_hat (zero diagonal, rows summing to 1)."""
    cfg = model.config
    q = cfg.hidden_size
    kv = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    qv = np.concatenate([np.arange(q), np.arange(q + kv, q + 2 * kv)])  # k channels are never gated
    s = max(2, round(ratio * (q + 2 * kv)))
    gates = []
    for _ in range(cfg.num_hidden_layers):
        w_hat = rng.random((s, s))  # [S, S]
        np.fill_diagonal(w_hat, 0.0)
        w_hat /= w_hat.sum(1, keepdims=True)
        g = {"channels": np.sort(rng.choice(qv, s, replace=False)).astype(np.int64),  # [S]
             "mu": rng.uniform(0.3, 1.0, s), "sigma": rng.uniform(0.2, 0.6, s),  # about |h| at std 0.02 weights
             "w": rng.uniform(-1.0, 1.0, s), "w_hat": w_hat}
        gates.append({k: torch.as_tensor(v if k == "channels" else v.astype(np.float32), device=device)
                      for k, v in g.items()})
    return gates


def gate_model(model, gates: list[dict], alpha: float = ALPHA):
    """Install `edit.conditions` the way `hf_reference.load_ne_model` does, with the gates as
    condition "ne"; returns the condition table (`.use("ne")` gates, `.use("base")` is the plain model)."""
    table = install(model)
    table.add("ne", NEEdit(dict(enumerate(gates)), alpha, BETA, LAM))
    return table


def random_batches(s: dict, vocab: int, seed: int, span: tuple[int, int] | None = None) -> list[Span]:
    """batches x batch spans of seq random tokens; intensities pool over tokens [start, end) of
    each, by default the second half."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (s["batches"] * s["batch"], s["seq"]), generator=gen)  # [spans, seq]
    start, end = span or (s["seq"] // 2, s["seq"])
    return [Span(row.tolist(), start, end) for row in ids]


def interleaved(fns: dict, warmup: int, reps: int, device: str) -> dict:
    """Median seconds of each function, timed in turn (drift hits all alike) after warm-ups."""
    times = {k: [] for k in fns}
    for i in range(warmup + reps):
        for k, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if i >= warmup:
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def masked_rows(model, kinds: dict, batch: int, dev: str) -> dict:
    """Per kind of spans, the rows [spans, neurons] float32 by the plain formula (a 0/1 span mask over
    every token, mean |h|, no capture code), all kinds from one forward a batch: spans of every kind
    share their token ids, so the batches are the same."""
    layout = layout_of(model)
    decoder = model.get_decoder()
    first = next(iter(kinds.values()))
    rows = {k: torch.zeros((len(first), layout.total)) for k in kinds}
    for idx in _batches(first, batch):
        weights = {}  # kind -> [batch, tokens] span mask / span length
        for k, spans in kinds.items():
            _, _, span = _collate(spans, idx, 0, dev)
            weights[k] = span / span.sum(1, keepdim=True)

        def hook(off, weights=weights, idx=idx):  # bound now: a fresh hook each batch
            def fn(module, args, out):
                a = out.float().abs()  # [batch, tokens, size]
                for k, w in weights.items():
                    rows[k][idx, off:off + a.shape[-1]] = torch.einsum("bt,btc->bc", w, a).cpu()
            return fn

        ids, attn, _ = _collate(first, idx, 0, dev)
        handles = [getattr(layer.self_attn, f"{p}_proj").register_forward_hook(hook(layout.flat(i, p, 0)))
                   for i, layer in enumerate(model.model.layers) for p in "qkv"]
        try:
            with torch.no_grad():
                decoder(input_ids=ids, attention_mask=attn, use_cache=False)
        finally:
            for h in handles:
                h.remove()
    return rows


# --------------------------------------------------------------------------- parts

def part_capture(s: dict, state: dict) -> dict:
    """The same sequences captured with three span shapes: the last `response` tokens (what identify
    pools over: a short response after a ~130-token prompt, or one decision token) -> capture_ratio;
    the second half (the span of earlier runs of this check) and every token, for comparison."""
    model = state["model"]()
    dev = s["device"]
    seq, resp = s["seq"], s["response"]
    shapes = {"capture": (seq - resp, seq), "capture_half_span": (seq // 2, seq), "capture_full_span": (0, seq)}
    spans = {k: random_batches(s, model.config.vocab_size, seed=1, span=v) for k, v in shapes.items()}
    tokens = len(spans["capture"]) * seq
    decoder = model.get_decoder()

    def plain():
        with torch.no_grad():
            for idx in _batches(spans["capture"], s["batch"]):
                ids, attn, _ = _collate(spans["capture"], idx, 0, dev)
                decoder(input_ids=ids, attention_mask=attn, use_cache=False)

    with tempfile.TemporaryDirectory() as d:
        def cap(kind):  # the identify code path itself: hooks, pooling, rows to an on-disk float16 matrix
            return lambda: capture(model, spans[kind], Path(d) / f"{kind}.safetensors", s["batch"], 0, progress=False)

        t = interleaved({"plain": plain, **{k: cap(k) for k in shapes}}, s["warmup"], s["reps"], dev)
        # The matrices the last timed runs wrote (rows copied back asynchronously, written a batch
        # late) against the plain masked formula: float16 storage and float32 summation order apart.
        ref = masked_rows(model, spans, s["batch"], dev)
        worst = 0.0
        for k in shapes:
            got = torch.from_numpy(np.asarray(open_matrix(Path(d) / f"{k}.safetensors"), dtype=np.float32))
            worst = max(worst, float(((got - ref[k]).abs() / (ref[k].abs() + 1e-3)).max()))
    out = {"capture_ratio": t["plain"] / t["capture"], "plain_tok_s": tokens / t["plain"],
           "capture_tok_s": tokens / t["capture"], "capture_span_tokens": resp,
           "capture_check_max_rel": worst, "capture_check_pass": worst <= 2e-3}
    for k in ("capture_half_span", "capture_full_span"):
        out[k.replace("capture", "capture_ratio")] = t["plain"] / t[k]
        out[f"{k}_tok_s"] = tokens / t[k]
    out["capture_tokens_per_pass"] = tokens
    return out


def part_gate(s: dict, state: dict) -> dict:
    model = state["model"]()
    dev = s["device"]
    spans = random_batches(s, model.config.vocab_size, seed=2)
    tokens = len(spans) * s["seq"]
    gates = random_gate(model, s["ne_ratio"], np.random.default_rng(3), dev)
    table = gate_model(model, gates)
    decoder = model.get_decoder()
    batches = [_collate(spans, idx, 0, dev)[:2] for idx in _batches(spans, s["batch"])]

    def run(condition):
        def fn():
            table.use(condition)
            with torch.no_grad():
                for ids, attn in batches:
                    decoder(input_ids=ids, attention_mask=attn, use_cache=False)
        return fn

    try:
        t = interleaved({"base": run("base"), "gated": run("ne")}, s["warmup"], s["reps"], dev)
    finally:
        table.use("base")
    return {"ne_gate_ratio": t["base"] / t["gated"], "ne_base_tok_s": tokens / t["base"],
            "ne_gated_tok_s": tokens / t["gated"], "ne_channels_per_layer": len(gates[0]["channels"])}


def part_scoring(s: dict, state: dict) -> dict:
    dev = s["device"]
    n = neuron_count(s["model"])
    gen = torch.Generator(device=dev).manual_seed(4)
    a = torch.rand((s["pairs"], n), generator=gen, device=dev, dtype=torch.float64)  # [nA, n] intensities
    b = torch.rand((s["pairs"], n), generator=gen, device=dev, dtype=torch.float64)  # [nB, n]
    b += torch.linspace(0.0, 0.5, n, device=dev, dtype=torch.float64)  # contrast growing across neurons
    plan = scoring.Plan.make(s["pairs"], s["pairs"], seed=5, k=s["k"])

    def loss(x, y, **kw):
        t0 = time.perf_counter()
        out = scoring.coco_loss(x, y, plan, **kw)
        sync(x.device.type)
        return out, time.perf_counter() - t0

    loss(a[:, :256], b[:, :256], chunk_elements=s["chunk"])  # warm-up: kernels, allocator
    l64, t64 = loss(a, b, chunk_elements=s["chunk"])  # [n]
    l32, t32 = loss(a.float(), b.float(), chunk_elements=s["chunk"])  # [n]
    top = max(1, n // 100)  # float32's effect on what is selected: overlap of the top 1% by L (lowest)
    top64 = set(l64.topk(top, largest=False).indices.tolist())
    top32 = set(l32.topk(top, largest=False).indices.tolist())

    m = min(s["cpu_neurons"], n)
    ac, bc = a[:, :m].cpu(), b[:, :m].cpu()  # [nA, m], [nB, m]
    loss(ac[:, :8], bc[:, :8])  # warm-up: CPU thread pool
    lc, tc = loss(ac, bc)  # default chunk, as identify runs it
    cpu_full = tc * n / m
    return {"scoring_neurons": n, "scoring_pairs": s["pairs"], "scoring_k": plan.neg_a.shape[1],
            "scoring_gpu_s_per_category": t64, "scoring_gpu_s_6_categories": 6 * t64,
            "scoring_gpu_f32_s_per_category": t32,
            "scoring_f32_max_abs_diff": float((l64 - l32.double()).abs().max()),
            "scoring_f32_top1pct_overlap": len(top64 & top32) / top,
            "scoring_cpu_slice_neurons": m, "scoring_cpu_slice_s": tc,
            "scoring_cpu_projected_s_per_category": cpu_full, "scoring_speedup": cpu_full / t64,
            "scoring_parity_max_abs": float((l64[:m].cpu() - lc).abs().max())}


def part_parity(s: dict, state: dict) -> dict:
    shape = s["parity_model"]
    ref_dev, ref_dtype = s["parity_ref"]
    cpu = build_llama(shape, torch.float32, "cpu", seed=6)
    other = copy.deepcopy(cpu).to(ref_dev, ref_dtype)  # the same weights and gate, on the other side
    gates = random_gate(cpu, 0.01, np.random.default_rng(7), "cpu")
    table = gate_model(cpu, gates)
    gate_model(other, gates).use("ne")
    table.use("ne")
    gen = torch.Generator().manual_seed(8)
    ids = torch.randint(0, shape["vocab_size"], (s["parity_prompts"], s["parity_len"]), generator=gen)  # [p, t]

    def logprobs(model):
        dev = next(model.parameters()).device
        with torch.no_grad():
            logits = model(input_ids=ids.to(dev), use_cache=False).logits.double().cpu()  # [p, t, V]
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]  # [p, t-1]
        return lp, logits.argmax(-1)  # next-token log-likelihoods, greedy picks [p, t]

    lp_cpu, g_cpu = logprobs(cpu)
    lp_ref, g_ref = logprobs(other)
    del other
    table.use("base")  # how much the gate moves the logprobs at all
    lp_base, _ = logprobs(cpu)
    worst = float((lp_cpu - lp_ref).abs().max())
    return {"parity_model": f"{s['parity_name']} ({shape['num_hidden_layers']} layers, hidden "
                            f"{shape['hidden_size']}), seeded random weights (not the real model's), NE gate on",
            "parity_compared": f"cpu float32 vs {ref_dev} {str(ref_dtype).replace('torch.', '')}",
            "parity_positions": lp_cpu.numel(), "parity_max_abs_logprob": worst, "parity_pass": worst <= PARITY_TOL,
            "parity_greedy_agreement": float((g_cpu == g_ref).double().mean()),
            "parity_greedy_last_agree": int((g_cpu[:, -1] == g_ref[:, -1]).sum()),
            "parity_gate_max_effect": float((lp_cpu - lp_base).abs().max())}


# --------------------------------------------------------------------------- driver

def environment(s: dict) -> dict:
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "cuda": torch.version.cuda,
           "cpu_threads": torch.get_num_threads(), "heavy_imports": HEAVY_IMPORTS}
    env["device"] = torch.cuda.get_device_name(0) if s["device"] == "cuda" else f"cpu ({platform.machine()})"
    return env


def table(res: dict) -> str:
    rows = [("capture", "capture_ratio", "capture / plain tok/s ({capture_tok_s:,.0f} / {plain_tok_s:,.0f}), span the "
             "last {capture_span_tokens} (half {capture_ratio_half_span:.3f}, all {capture_ratio_full_span:.3f})"),
            ("gate", "ne_gate_ratio", "gated / base tok/s ({ne_gated_tok_s:,.0f} / {ne_base_tok_s:,.0f}), "
                                      "{ne_channels_per_layer} channels a layer"),
            ("scoring", "scoring_gpu_s_per_category", "s a category float64 on {device} (float32 "
             "{scoring_gpu_f32_s_per_category:.3g} s); CPU projected {scoring_cpu_projected_s_per_category:,.4g} s "
             "(x{scoring_speedup:,.0f}); parity {scoring_parity_max_abs:.1e}"),
            ("parity", "parity_max_abs_logprob", "max |d logprob| ({parity_compared}), greedy agreement "
             "{parity_greedy_agreement:.4f}, gate effect {parity_gate_max_effect:.3f}")]
    lines = [f"{'part':<9} {'value':>12}  what", "-" * 72]
    for part, key, what in rows:
        if part in res["errors"]:
            lines.append(f"{part:<9} {'FAILED':>12}  {res['errors'][part]}")
        elif res.get(key) is not None:
            lines.append(f"{part:<9} {res[key]:>12.4g}  {what.format(**res)}")
    six = res.get("scoring_gpu_s_6_categories")
    if six is not None:  # the scoring part ran
        lines.append(f"6 categories of scoring on the device: {six:.1f} s (identify also scores 3 null rounds: x4)")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="also write the JSON object to this file")
    ap.add_argument("--dry-run", action="store_true", help="every part on the CPU with tiny shapes (seconds)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    args = ap.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    if set(parts) - set(PARTS):
        ap.error(f"unknown part(s) {','.join(sorted(set(parts) - set(PARTS)))}; choose from {','.join(PARTS)}")
    s = DRY if args.dry_run else FULL
    if s["device"] == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device visible; run with --dry-run for the CPU version")
    # Parity is measured in true float32: TF32 would round matmul inputs to 10 mantissa bits.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    t_start = time.perf_counter()
    res = {"tool": "gpu_check", "dry_run": args.dry_run, **environment(s), "errors": {}, "wall_s": {}}
    say(f"gpu_check: {res['device']}, torch {res['torch']} (CUDA {res['cuda']}), transformers "
        f"{res['transformers']}, parts {','.join(parts)}")
    if HEAVY_IMPORTS:
        say(f"WARNING: importing vllm_coco pulled in {', '.join(HEAVY_IMPORTS)} (absent on the GPU machine)")

    cache = {}

    def model():  # the 8B-shaped model, built once for capture and gate
        if "m" not in cache:
            t0 = time.perf_counter()
            cache["m"] = build_llama(s["model"], s["dtype"], s["device"], seed=0)
            res["wall_s"]["build_model"] = time.perf_counter() - t0
            say(f"  built {neuron_count(s['model']):,}-neuron model in {res['wall_s']['build_model']:.1f} s")
        return cache["m"]

    state = {"model": model}
    fns = {"capture": part_capture, "gate": part_gate, "scoring": part_scoring, "parity": part_parity}
    for part in PARTS:  # capture and gate share the model; it is freed before scoring needs the memory
        if part not in parts:
            continue
        if part == "scoring":
            cache.clear()
            gc.collect()
            if s["device"] == "cuda":
                torch.cuda.empty_cache()
        say(f"[{part}] ...")
        t0 = time.perf_counter()
        try:
            out = fns[part](s, state)
            res.update(out)
            say("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in out.items()))
        except Exception as exc:  # one part's failure must not cost the others their figures
            res["errors"][part] = f"{type(exc).__name__}: {exc}"[:500]
            say(f"  FAILED: {res['errors'][part]}")
        res["wall_s"][part] = time.perf_counter() - t0
    if s["device"] == "cuda":
        res["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 2**30
    res["wall_s"]["total"] = time.perf_counter() - t_start
    res = {k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in res.items()}  # keeps 1e-15 too
    res["wall_s"] = {k: round(v, 2) for k, v in res["wall_s"].items()}
    say(table(res))
    line = json.dumps(res)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(line + "\n")
    print(line, flush=True)
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
