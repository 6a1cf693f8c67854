"""`coco-tools identify`: contrast data -> capture -> COCO scores -> selection -> artifact."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import METHOD_VERSION, __version__, artifact, scoring, selection
from .atomic import atomic_output_dir, check_output_dir
from .errors import CocoError
from .models import PROJS, fingerprint, load_model, read_config, resolve_model_dir

# Neurons per block when scoring: one [rows, block] float64 slice of the matrix is in memory.
SCORE_BLOCK = 4096


@dataclass
class IdentifyOptions:
    data: str = "bbq"
    categories: tuple | None = None
    split: str = "identify"
    limit: int | None = None
    ratio: float = 0.01
    threshold: float | None = None
    baseline: str = "coco"
    weighting: str = "magnitude"
    tau: float = scoring.TAU
    k_negatives: int = scoring.K_NEGATIVES
    null_rounds: int = 3
    seed: int = 0
    batch_size: int = 8
    dtype: str = "float32"
    device: str = "cpu"

    def validate(self) -> None:
        if self.threshold is None:
            selection.count_for(1000, self.ratio)  # raises on a ratio outside (0, 1]
        if self.baseline not in selection.BASELINES:
            raise CocoError(f"unknown --baseline {self.baseline}; choose one of {', '.join(selection.BASELINES)}")
        if self.weighting not in selection.WEIGHTINGS:
            raise CocoError(f"unknown --weighting {self.weighting}; choose magnitude or signed")
        if self.batch_size < 1:
            raise CocoError(f"--batch-size {self.batch_size} must be at least 1")
        if self.tau <= 0:
            raise CocoError(f"--tau {self.tau} must be positive")
        if self.null_rounds < 0:
            raise CocoError(f"--null-rounds {self.null_rounds} must be >= 0")


def _weight_norms(model, layout) -> np.ndarray:
    """L2 norm of every q/k/v weight row: the NORM baseline statistic. -> [N]"""
    from .models import attention_layers

    out = np.empty(layout.total, dtype=np.float64)
    for layer, attn in enumerate(attention_layers(model)):
        for p in PROJS:
            w = getattr(attn, f"{p}_proj").weight.detach().float()  # [out, in]
            off = layout.flat(layer, p, 0)
            out[off:off + w.shape[0]] = w.norm(dim=1).cpu().numpy()
    return out


def score_matrix(matrix, row_cat: np.ndarray, row_label: np.ndarray, categories, opts: IdentifyOptions,
                 progress: bool = True) -> dict:
    """COCO loss / score / direction per category (and the null's per-round scores), block by block.

    matrix: [rows, N] (memmap). Rows of category c with label 0 form A (biased), label 1 form B
    (unbiased); in response mode the i-th A row and i-th B row come from the same item (paired).
    """
    import torch
    from tqdm.auto import tqdm

    n = matrix.shape[1]
    res = {}
    plans, nulls, rows = {}, {}, {}
    for ci, cat in enumerate(categories):
        ra = np.flatnonzero((row_cat == ci) & (row_label == 0))
        rb = np.flatnonzero((row_cat == ci) & (row_label == 1))
        rows[cat] = (ra, rb)
        seed = opts.seed * 1000 + ci
        plans[cat] = scoring.Plan.make(len(ra), len(rb), seed=seed, k=opts.k_negatives)
        nulls[cat] = scoring.null_rounds(len(ra), len(rb), paired=True, rounds=opts.null_rounds, seed=seed + 1)
        res[cat] = {k: np.empty(n) for k in ("loss", "direction", "mean_intensity")}
        res[cat]["null_score"] = np.empty((opts.null_rounds, n))
    blocks = range(0, n, SCORE_BLOCK)
    for c0 in tqdm(blocks, desc="score", unit="block", disable=not progress):
        block = torch.from_numpy(np.asarray(matrix[:, c0:c0 + SCORE_BLOCK], dtype=np.float64))  # [rows, block]
        for cat in categories:
            ra, rb = rows[cat]
            a, b = block[ra], block[rb]  # [nA, block], [nB, block]
            r = res[cat]
            sl = slice(c0, c0 + block.shape[1])
            r["loss"][sl] = scoring.coco_loss(a, b, plans[cat], opts.tau).numpy()
            r["direction"][sl] = scoring.direction(a, b).numpy()
            r["mean_intensity"][sl] = torch.cat([a, b]).mean(0).numpy()
            both = torch.cat([a, b])
            for i, (ia, ib) in enumerate(nulls[cat]):
                null_loss = scoring.coco_loss(both[ia], both[ib], plans[cat], opts.tau)
                r["null_score"][i, sl] = plans[cat].log1pk - null_loss.numpy()
    for cat in categories:
        res[cat]["score"] = plans[cat].log1pk - res[cat]["loss"]
        res[cat]["n_pairs"] = int(len(rows[cat][0]))
    return res


def _select(score, loss, total, opts) -> np.ndarray:
    if opts.threshold is not None:
        return above_threshold_or_fail(score, loss, opts.threshold)
    return selection.top_by_loss(loss, selection.count_for(total, opts.ratio))


def above_threshold_or_fail(score, loss, threshold):
    sel = selection.above_threshold(score, loss, threshold)
    if len(sel) == 0:
        raise CocoError(f"no neuron scores at least --threshold {threshold} (best: {np.max(score):.4g}); "
                        "lower the threshold or use --ratio")
    return sel


def _neuron_list(sel, layout_arrays, score, direction, weight=None, loss=None):
    projs = np.array(PROJS)
    out = []
    for i, n in enumerate(sel):
        item = {"layer": int(layout_arrays["layer"][n]), "proj": str(projs[layout_arrays["proj"][n]]),
                "index": int(layout_arrays["index"][n]), "score": float(score[n]),
                "direction": float(direction[n])}
        if loss is not None:
            item["loss"] = float(loss[n])
        if weight is not None:
            item["weight"] = float(weight[i])
        out.append(item)
    return out


def identify(model: str, out: str, opts: IdentifyOptions, force: bool = False, progress: bool = True) -> dict:
    """Run the whole identify job; returns the written neurons.json content."""
    from .capture import capture, open_matrix, response_spans
    from .data import load_contrast

    t0 = time.time()
    opts.validate()
    model_dir = resolve_model_dir(model)
    check_output_dir(out, force, sources=(model_dir,))
    pairs, data_info = load_contrast(opts.data, opts.categories, opts.split, opts.limit, opts.seed)
    categories = list(dict.fromkeys(p.category for p in pairs))
    config = read_config(model_dir)
    hf_model, tokenizer = load_model(model_dir, opts.dtype, opts.device)
    spans = response_spans(tokenizer, pairs)
    fp = fingerprint(model_dir)

    with atomic_output_dir(out, force) as tmp:
        cap = capture(hf_model, spans, tmp / artifact.MATRIX_FILE, opts.batch_size,
                      pad_id=tokenizer.pad_token_id, progress=progress)
        layout = cap.layout
        t_capture = time.time() - t0
        weight_norm = _weight_norms(hf_model, layout)
        del hf_model
        cat_index = {c: i for i, c in enumerate(categories)}
        row_cat = np.repeat([cat_index[p.category] for p in pairs], 2).astype(np.int32)
        row_label = np.tile([0, 1], len(pairs)).astype(np.int32)
        res = score_matrix(open_matrix(tmp / artifact.MATRIX_FILE), row_cat, row_label, categories, opts, progress)

        la = layout.arrays()
        total = layout.total
        loss = np.mean([res[c]["loss"] for c in categories], axis=0)
        score = np.mean([res[c]["score"] for c in categories], axis=0)
        direc = np.mean([res[c]["direction"] for c in categories], axis=0)
        coco_sel = _select(score, loss, total, opts)
        sel = selection.baseline(opts.baseline, coco_sel, proj=la["proj"], weight_norm=weight_norm,
                                 mean_intensity=cap.mean_intensity, seed=opts.seed)
        weight = selection.edit_weights(direc[sel], opts.weighting)
        null_comb = np.mean([res[c]["null_score"] for c in categories], axis=0)  # [rounds, N]
        null_best = float(null_comb.max()) if opts.null_rounds else None

        per_category = {}
        for cat in categories:
            r = res[cat]
            if opts.baseline == "coco":
                csel = _select(r["score"], r["loss"], total, opts)
            else:
                csel = selection.baseline(opts.baseline, _select(r["score"], r["loss"], total, opts),
                                          proj=la["proj"], weight_norm=weight_norm,
                                          mean_intensity=r["mean_intensity"], seed=opts.seed)
            cnull = float(r["null_score"].max()) if opts.null_rounds else None
            per_category[cat] = {
                "pairs": r["n_pairs"], "count": int(len(csel)), "null_best_score": cnull,
                "beat_null": None if cnull is None else int(np.sum(r["score"][csel] > cnull)),
                "neurons": _neuron_list(csel, la, r["score"], r["direction"],
                                        selection.edit_weights(r["direction"][csel], opts.weighting)),
            }

        by_proj = {p: int(np.sum(la["proj"][sel] == i)) for i, p in enumerate(PROJS)}
        meta = {
            "method": METHOD_VERSION,
            "tool": f"vllm-coco {__version__}",
            "model": {"path": str(model_dir), "architecture": (config.get("architectures") or ["?"])[0],
                      **layout.to_json(), "num_neurons": total, "fingerprint": fp, "dtype": opts.dtype},
            "data": {**data_info, "contrast": "response", "pairs": len(pairs), "rows": cap.rows,
                     "tokens": cap.tokens, "calibration_tokens": cap.span_tokens},
            "selection": {"rule": "threshold" if opts.threshold is not None else "ratio",
                          "ratio": None if opts.threshold is not None else opts.ratio,
                          "threshold": opts.threshold, "baseline": opts.baseline, "weighting": opts.weighting,
                          "count": int(len(sel)), "by_proj": by_proj, "tau": opts.tau,
                          "k_negatives": opts.k_negatives, "seed": opts.seed,
                          "combined": "mean of per-category scores"},
            "significance": {"null": "labels swapped at random within each pair", "rounds": opts.null_rounds,
                             "null_best_score": null_best,
                             "beat_null": None if null_best is None else int(np.sum(score[sel] > null_best))},
            "categories": categories,
            "neurons": _neuron_list(sel, la, score, direc, weight, loss),
            "per_category": per_category,
            "timing_s": {"capture": round(t_capture, 2), "total": round(time.time() - t0, 2)},
        }
        arrays = {
            "layer": la["layer"].astype(np.int32), "proj": la["proj"].astype(np.int32),
            "index": la["index"].astype(np.int32),
            "loss": loss, "score": score, "direction": direc.astype(np.float32),
            "calib_mean": cap.calib_mean.astype(np.float32), "calib_std": cap.calib_std.astype(np.float32),
            "act_mean": cap.act_mean.astype(np.float32),
            "mean_intensity": cap.mean_intensity.astype(np.float32), "weight_norm": weight_norm.astype(np.float32),
            "selected": sel.astype(np.int64), "weight": weight.astype(np.float32),
            "row_category": row_cat, "row_label": row_label,
        }
        for cat in categories:
            for key in ("loss", "score"):
                arrays[f"{key}.{cat}"] = res[cat][key]
            arrays[f"direction.{cat}"] = res[cat]["direction"].astype(np.float32)
        artifact.save(tmp, meta, arrays)
    return meta
