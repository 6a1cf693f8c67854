"""`coco-tools identify`: contrast data -> capture -> COCO scores -> selection -> artifact."""

from __future__ import annotations

# Lazy imports: torch, numpy are imported inside the functions that use them (directly or through
# the modules they import), so importing this module stays light.
import shutil
import time
from contextlib import closing
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from vllm_coco import METHOD_VERSION, __version__
from vllm_coco.core import artifact
from vllm_coco.core import names as N
from vllm_coco.core.atomic import atomic_output_dir, check_output_dir
from vllm_coco.core.checks import finite
from vllm_coco.core.errors import CocoError
from vllm_coco.core.json_file import read_config
from vllm_coco.core.models import PROJS, fingerprint, load_model, resolve_model_dir
from vllm_coco.core.names import CONTRASTS, SCORINGS  # noqa: F401 (CONTRASTS re-exported)
from vllm_coco.data import contrast
from vllm_coco.identify import scoring, selection

# Neurons per block when scoring: one [rows, block] float64 slice of the matrix is in memory.
SCORE_BLOCK = 4096
NULLS = {"response": "labels swapped at random within each pair",  # docs/METHOD.md §4
         "stereotype": "labels swapped at random within each pair",
         "behavior": "the two sets' union shuffled and re-split at the same sizes"}


@dataclass
class IdentifyOptions:
    data: str = "bbq"
    categories: tuple | None = None
    split: str = N.SPLITS[0]
    limit: int | None = None
    ratio: float = N.RATIO
    threshold: float | None = None
    baseline: str = N.BASELINES[0]
    weighting: str = N.WEIGHTINGS[0]
    tau: float = N.TAU
    k_negatives: int = N.K_NEGATIVES
    null_rounds: int = N.NULL_ROUNDS
    seed: int = N.SEED
    batch_size: int = N.BATCH_SIZE
    dtype: str = N.DTYPES[0]
    device: str = "cpu"
    device_map: str | None = None  # names.DEVICE_MAPS: the model spread over devices (scoring stays on `device`)
    chat: bool = True  # render prompts with the model's chat template (when it has one)
    contrast: str = N.CONTRASTS[0]  # response (teacher-forced pairs) | behavior (the model's own answers)
    #                                   | stereotype (lettered options, the answer letter teacher-forced)
    abstention_filter: bool = False  # stereotype: leave out neurons the abstention control explains (§5.6)
    scoring: str = N.SCORINGS[0]  # behavior mode: how the model's answer is chosen (sum | per-byte)
    backend: str = N.IDENTIFY_BACKENDS[0]  # hf (a transformers forward) | vllm (inside a vLLM engine)
    tensor_parallel_size: int = 1  # backend vllm: vLLM's parallelism (names.PARALLEL_OPTIONS)
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1  # refused above 1: identify runs one engine
    distributed_executor_backend: str | None = None  # backend vllm: names.EXECUTOR_BACKENDS

    def engine(self) -> dict:
        """vLLM engine arguments for --backend vllm (what the user set)."""
        out = {k: getattr(self, k) for k in ("tensor_parallel_size", "pipeline_parallel_size") if getattr(self, k) > 1}
        if self.distributed_executor_backend:
            out["distributed_executor_backend"] = self.distributed_executor_backend
        return out

    def validate(self) -> None:
        finite(self.ratio, "--ratio")
        if self.threshold is None:
            selection.count_for(1000, self.ratio)  # raises on a ratio outside (0, 1]
        else:
            finite(self.threshold, "--threshold")
        finite(self.tau, "--tau", lo=0, lo_open=True)
        lo, hi = N.TAU_RANGE
        if not lo <= self.tau <= hi:
            raise CocoError(f"--tau {self.tau:g} is outside [{lo:g}, {hi:g}]: that far from the "
                            f"default {N.TAU:g} the InfoNCE softmax is flat (every score ties) or one-hot; "
                            f"pass e.g. --tau {N.TAU:g}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise CocoError(f"--seed {self.seed!r} must be an integer >= 0")
        if self.limit is not None and self.limit < 1:
            raise CocoError(f"--limit {self.limit} must be at least 1")
        if self.baseline not in selection.BASELINES:
            raise CocoError(f"unknown --baseline {self.baseline}; choose one of {', '.join(selection.BASELINES)}")
        if self.weighting not in selection.WEIGHTINGS:
            raise CocoError(f"unknown --weighting {self.weighting}; choose {' or '.join(N.WEIGHTINGS)}")
        if self.contrast not in CONTRASTS:
            raise CocoError(f"unknown --contrast {self.contrast}; choose {' or '.join(CONTRASTS)}")
        if self.abstention_filter and self.contrast != "stereotype":
            raise CocoError("--abstention-filter needs --contrast stereotype (whose items give the abstention "
                            "control's rows); add --contrast stereotype or drop --abstention-filter")
        if self.scoring not in SCORINGS:
            raise CocoError(f"unknown --scoring {self.scoring}; choose {' or '.join(SCORINGS)}")
        from vllm_coco.identify.behavior import MIN_PER_SET

        if self.contrast == "behavior" and self.limit is not None and self.limit < 2 * MIN_PER_SET:
            raise CocoError(f"--limit {self.limit} is too small for --contrast behavior: the model must answer at "
                            f"least {MIN_PER_SET} items biased and {MIN_PER_SET} \"unknown\" per category; "
                            f"use --limit {2 * MIN_PER_SET} or more (more is better)")
        if self.batch_size < 1:
            raise CocoError(f"--batch-size {self.batch_size} must be at least 1")
        from vllm_coco.core.models import check_device

        check_device(self.device)
        if self.device_map is not None and self.device_map not in N.DEVICE_MAPS:
            raise CocoError(f"--device-map {self.device_map} is not one of {', '.join(N.DEVICE_MAPS)}")
        if self.null_rounds < 0:
            raise CocoError(f"--null-rounds {self.null_rounds} must be >= 0")
        if self.backend not in N.IDENTIFY_BACKENDS:
            raise CocoError(f"unknown --backend {self.backend}; choose {' or '.join(N.IDENTIFY_BACKENDS)}")
        if self.backend != "vllm" and self.engine():
            raise CocoError("--tensor-parallel-size, --pipeline-parallel-size and --distributed-executor-backend "
                            "need --backend vllm (the hf backend spreads a model with --device-map)")
        if self.data_parallel_size != 1:
            raise CocoError("identify runs one engine: --data-parallel-size is not taken; spread the model with "
                            "--tensor-parallel-size / --pipeline-parallel-size")
        if self.backend == "vllm" and self.device_map is not None:
            raise CocoError("--device-map is for --backend hf; with --backend vllm use --tensor-parallel-size / "
                            "--pipeline-parallel-size")


def check_scores_rank(loss: np.ndarray, tau: float) -> None:
    """The combined COCO losses can rank neurons: some are finite and not all equal (a temperature
    far from the default, or data without contrast, ties them all). CocoError before anything is written."""
    real = loss[np.isfinite(loss)]
    if real.size == 0 or real.min() == real.max():
        raise CocoError(f"every neuron got the same COCO loss at --tau {tau:g}, so no neuron ranks above another; "
                        f"pass a --tau near the default {N.TAU:g}, or contrast data whose two responses differ")


def mean_diff_coef(row_cat: np.ndarray, row_label: np.ndarray, n_categories: int) -> np.ndarray:
    """[categories, rows] row weights whose product with the rows' signed mean activations is, per
    category, the mean over its unbiased rows (label 1) minus the mean over its biased rows (label 0):
    the diff-in-means steering vector (docs/METHOD.md §1.4). Other labels weigh 0."""
    coef = np.zeros((n_categories, len(row_cat)))
    for c in range(n_categories):
        for label, sign in ((N.ROW_UNBIASED, 1.0), (N.ROW_BIASED, -1.0)):
            rows = (row_cat == c) & (row_label == label)
            coef[c, rows] = sign / max(int(rows.sum()), 1)
    return coef


def _weight_norms(model, layout) -> np.ndarray:
    """L2 norm of every q/k/v weight row: the NORM baseline statistic. -> [N]"""
    from vllm_coco.core.models import attention_layers

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
    (unbiased); in response mode the i-th A row and i-th B row come from the same item (paired),
    in behavior mode the sets are unpaired (the null shuffles across them).
    """
    import torch

    n = matrix.shape[1]
    res = {}
    plans, nulls, rows = {}, {}, {}
    for ci, cat in enumerate(categories):
        ra = np.flatnonzero((row_cat == ci) & (row_label == 0))
        rb = np.flatnonzero((row_cat == ci) & (row_label == 1))
        rows[cat] = (ra, rb)
        seed = opts.seed * 1000 + ci
        plans[cat] = scoring.Plan.make(len(ra), len(rb), seed=seed, k=opts.k_negatives)
        nulls[cat] = scoring.null_rounds(len(ra), len(rb), paired=opts.contrast in N.PAIRED_CONTRASTS,
                                         rounds=opts.null_rounds, seed=seed + 1)
        res[cat] = {k: np.empty(n) for k in ("loss", "direction", "mean_intensity")}
        res[cat]["null_score"] = np.empty((opts.null_rounds, n))
    # Scoring runs where the capture ran (--device): on a GPU the [anchors, K, neurons] temporaries
    # may be far larger (2 GB each) than the CPU's cache-friendly 64 MB.
    dev = torch.device(opts.device)
    chunk = scoring.CHUNK_ELEMENTS if dev.type == "cpu" else scoring.CHUNK_ELEMENTS_GPU
    blocks = range(0, n, SCORE_BLOCK)
    for c0 in tqdm(blocks, desc="score", unit="block", disable=not progress):
        block = torch.from_numpy(np.asarray(matrix[:, c0:c0 + SCORE_BLOCK], dtype=np.float64)).to(dev)  # [rows, block]
        for cat in categories:
            ra, rb = rows[cat]
            a, b = block[ra], block[rb]  # [nA, block], [nB, block]
            r = res[cat]
            sl = slice(c0, c0 + block.shape[1])
            r["loss"][sl] = scoring.coco_loss(a, b, plans[cat], opts.tau, chunk).cpu().numpy()
            r["direction"][sl] = scoring.direction(a, b).cpu().numpy()
            both = torch.cat([a, b])  # [nA + nB, block]
            r["mean_intensity"][sl] = both.mean(0).cpu().numpy()
            for i, (ia, ib) in enumerate(nulls[cat]):
                null_loss = scoring.coco_loss(both[ia], both[ib], plans[cat], opts.tau, chunk)
                r["null_score"][i, sl] = plans[cat].log1pk - null_loss.cpu().numpy()
    for cat in categories:
        res[cat]["score"] = plans[cat].log1pk - res[cat]["loss"]
        ra, rb = rows[cat]
        res[cat]["sizes"] = ({"pairs": int(len(ra))} if opts.contrast in N.PAIRED_CONTRASTS
                             else {"biased": int(len(ra)), "unknown": int(len(rb))})
    return res


def _select(score, loss, total, opts, explained: np.ndarray | None = None) -> np.ndarray:
    """The COCO set by opts' rule; `explained` [N] bool: neurons the abstention filter leaves out."""
    if explained is not None:
        score, loss = np.where(explained, -np.inf, score), np.where(explained, np.inf, loss)
        if opts.threshold is None and np.sum(~explained) < selection.count_for(total, opts.ratio):
            raise CocoError(f"the abstention filter leaves {int(np.sum(~explained))} of {total} neurons, fewer than "
                            f"--ratio {opts.ratio:g} asks for: the contrast separates little beyond \"unknown\" "
                            "on these data; lower --ratio, add data (--limit), or drop --abstention-filter")
    if opts.threshold is not None:
        return above_threshold_or_fail(score, loss, opts.threshold)
    return selection.top_by_loss(loss, selection.count_for(total, opts.ratio))


def abstention_explained(arrays: dict, suffix: str, opts) -> np.ndarray | None:
    """The neurons the abstention filter leaves out (docs/METHOD.md §5.6): those whose loss on the
    abstention control is at most their loss on the contrast ("unknown vs a named answer" separates
    them at least as well as the stereotype direction does). None without the filter. [N] bool"""
    if not opts.abstention_filter:
        return None
    if "abstention_loss" + suffix not in arrays:
        raise CocoError("this artifact has no abstention control (identify --contrast stereotype "
                        "--abstention-filter records it); re-run identify so, or drop --abstention-filter")
    return arrays["abstention_loss" + suffix] <= arrays["loss" + suffix]


def above_threshold_or_fail(score, loss, threshold):
    sel = selection.above_threshold(score, loss, threshold)
    if len(sel) == 0:
        raise CocoError(f"no neuron scores at least --threshold {threshold} (best: {np.max(score):.4g}); "
                        "lower the threshold or use --ratio")
    return sel


def _neuron_list(sel, arrays, score, direction, weight=None, loss=None):
    """neurons.json entries for `sel` (best first); `arrays` holds the per-neuron layer/proj/index."""
    out = []
    for i, n in enumerate(sel):
        item = {"layer": int(arrays["layer"][n]), "proj": PROJS[int(arrays["proj"][n])],
                "index": int(arrays["index"][n]), "score": float(score[n]),
                "direction": float(direction[n])}
        if loss is not None:
            item["loss"] = float(loss[n])
        if weight is not None:
            item["weight"] = float(weight[i])
        out.append(item)
    return out


def select_from_arrays(arrays: dict, categories, nulls: dict, sizes: dict, opts: IdentifyOptions) -> dict:
    """The selection parts of neurons.json from the per-neuron arrays (sets arrays["selected"] and
    arrays["weight"]). Shared by identify and `select`, which re-selects without re-capturing."""
    total = len(arrays["loss"])
    proj = arrays["proj"]
    score, loss, direc = arrays["score"], arrays["loss"], arrays["direction"]
    explained = abstention_explained(arrays, "", opts)
    sel = selection.baseline(opts.baseline, _select(score, loss, total, opts, explained), arrays, opts.seed)
    weight = selection.edit_weights(direc[sel].astype(np.float64), opts.weighting)
    arrays["selected"], arrays["weight"] = sel.astype(np.int64), weight.astype(np.float32)
    per_category = {}
    for cat in categories:
        c_score, c_dir = arrays[f"score.{cat}"], arrays[f"direction.{cat}"].astype(np.float64)
        c_explained = abstention_explained(arrays, f".{cat}", opts)
        csel = selection.baseline(opts.baseline, _select(c_score, arrays[f"loss.{cat}"], total, opts, c_explained),
                                  arrays, opts.seed, suffix=f".{cat}")
        cnull = nulls.get(cat)
        per_category[cat] = {
            **sizes[cat], "count": int(len(csel)), "null_best_score": cnull,
            "beat_null": None if cnull is None else int(np.sum(c_score[csel] > cnull)),
            "neurons": _neuron_list(csel, arrays, c_score, c_dir, selection.edit_weights(c_dir[csel], opts.weighting)),
        }
    null_best = nulls.get("combined")
    return {
        "selection": {"rule": "threshold" if opts.threshold is not None else "ratio",
                      "ratio": None if opts.threshold is not None else opts.ratio,
                      "threshold": opts.threshold, "baseline": opts.baseline, "weighting": opts.weighting,
                      "count": int(len(sel)), "by_proj": {p: int(np.sum(proj[sel] == i)) for i, p in enumerate(PROJS)},
                      "tau": opts.tau, "k_negatives": opts.k_negatives, "seed": opts.seed,
                      "abstention_filter": opts.abstention_filter,
                      # what the filter took out of the COCO ranking (a set not read off it: not applicable)
                      "abstention_removed": None if explained is None or opts.baseline not in ("coco", "rand") else
                      int(explained[_select(score, loss, total, opts)].sum()),
                      "combined": "mean of per-category scores"},
        "significance": {"null": NULLS[opts.contrast], "rounds": opts.null_rounds,
                         "null_best_score": null_best,
                         "beat_null": None if null_best is None else int(np.sum(score[sel] > null_best))},
        "neurons": _neuron_list(sel, arrays, score, direc, weight, loss),
        "per_category": per_category,
    }


def _stored_options(meta: dict, arrays: dict, neurons_dir, **overrides) -> IdentifyOptions:
    """The scoring and selection options an artifact was made with (its neurons.json), with overrides."""
    old = meta["selection"]
    opts = IdentifyOptions(**{"weighting": old["weighting"], "seed": old.get("seed", N.SEED),
                              "tau": old.get("tau", N.TAU), "k_negatives": old.get("k_negatives", N.K_NEGATIVES),
                              "null_rounds": meta["significance"].get("rounds", N.NULL_ROUNDS),
                              "threshold": old.get("threshold") if old.get("rule") == "threshold" else None,
                              "contrast": meta["data"].get("contrast", "response"),
                              "abstention_filter": bool(old.get("abstention_filter", False)),
                              "ratio": old.get("ratio") or N.RATIO, **overrides})
    if not isinstance(opts.seed, int) or not isinstance(opts.null_rounds, int):
        raise CocoError(f"{neurons_dir}/neurons.json: damaged selection or significance entries; "
                        "re-run `coco-tools identify`")
    opts.validate()
    if f"mean_intensity.{meta['categories'][0]}" not in arrays:
        raise CocoError(f"{neurons_dir} predates re-selection support; re-run `coco-tools identify`")
    return opts


def reselect(neurons_dir: str, out: str, baseline: str = "coco", ratio: float | None = None,
             threshold: float | None = None, weighting: str | None = None, seed: int | None = None,
             force: bool = False, abstention_filter: bool | None = None) -> dict:
    """A new artifact from an existing one with another selection (baseline, ratio, threshold,
    weighting, abstention filter on or off; None: the source's): no model run, the per-neuron arrays
    and intensity matrix are reused."""
    meta, arrays = artifact.load(neurons_dir)
    sources = (Path(neurons_dir),)
    check_output_dir(out, force, sources)
    old = meta["selection"]
    if ratio is None and threshold is None and old.get("rule") == "threshold":
        threshold = old.get("threshold")  # the source's own rule, as --help promises
    opts = _stored_options(meta, arrays, neurons_dir, baseline=baseline, weighting=weighting or old["weighting"],
                           seed=old.get("seed", N.SEED) if seed is None else seed, threshold=threshold,
                           ratio=ratio if ratio is not None else (old.get("ratio") or N.RATIO),
                           **({} if abstention_filter is None else {"abstention_filter": abstention_filter}))
    categories = meta["categories"]
    nulls = {"combined": meta["significance"].get("null_best_score"),
             **{c: meta["per_category"][c].get("null_best_score") for c in categories}}
    if any(v is not None and not isinstance(v, (int, float)) for v in nulls.values()):
        raise CocoError(f"{neurons_dir}/neurons.json: damaged selection or significance entries; "
                        "re-run `coco-tools identify`")
    sizes = {c: {k: meta["per_category"][c][k] for k in ("pairs", "biased", "unknown") if k in meta["per_category"][c]}
             for c in categories}
    new = {**meta, **select_from_arrays(arrays, categories, nulls, sizes, opts),
           "derived_from": {"artifact": str(Path(neurons_dir).absolute()),
                            "hash": artifact.artifact_hash(neurons_dir)}}
    with atomic_output_dir(out, force, sources) as tmp:
        artifact.save(tmp, new, arrays)
        matrix = Path(neurons_dir) / artifact.MATRIX_FILE
        if matrix.exists():
            try:  # the matrix is never written after identify: share it when the filesystem allows
                (tmp / artifact.MATRIX_FILE).hardlink_to(matrix)
            except OSError:
                shutil.copy2(matrix, tmp / artifact.MATRIX_FILE)
    return new


def rescore(neurons_dir: str, out: str, rows: np.ndarray, note: str, force: bool = False) -> dict:
    """A new artifact identified from a subset of an artifact's captured rows (`rows`: indices into
    its intensity matrix), with the source's scoring and selection options but no permutation null:
    no model run. The split-half stability check (identify/stability.py) scores each half this way.
    The new artifact has no intensity matrix (edits that need calibration intensities, NE, take the
    source); `note` says what the subset is."""
    from vllm_coco.identify.capture import open_matrix

    meta, arrays = artifact.load(neurons_dir)
    check_output_dir(out, force, (Path(neurons_dir),))
    matrix_path = Path(neurons_dir) / artifact.MATRIX_FILE
    if not matrix_path.exists() or "row_category" not in arrays or "row_label" not in arrays:
        raise CocoError(f"{neurons_dir} lacks its intensity matrix or row labels; re-run `coco-tools identify`")
    opts = _stored_options(meta, arrays, neurons_dir, null_rounds=0)
    categories = meta["categories"]
    row_cat = arrays["row_category"].astype(np.int64)  # [rows]
    keep = np.zeros(len(row_cat), dtype=bool)
    keep[np.asarray(rows, dtype=np.int64)] = True
    row_cat[~keep] = -1  # rows outside the subset belong to no category: score_matrix skips them
    matrix = open_matrix(matrix_path)
    res = score_matrix(matrix, row_cat, arrays["row_label"], categories, opts, progress=False)
    abstention = abstention_losses(matrix, row_cat, arrays["row_label"], categories, opts)
    new_arrays = {k: v for k, v in arrays.items() if k.split(".")[0] != "abstention_loss"}
    for key in ("loss", "score", "direction"):
        new_arrays[key] = np.mean([res[c][key] for c in categories], axis=0).astype(arrays[key].dtype)
    for cat in categories:
        for key in ("loss", "score", "direction", "mean_intensity"):
            new_arrays[f"{key}.{cat}"] = res[cat][key].astype(arrays[f"{key}.{cat}"].dtype)
    new_arrays["rows"] = np.sort(np.flatnonzero(keep)).astype(np.int64)  # [subset rows] into the source matrix
    for key in [k for k in new_arrays if k.split(".")[0] == "mean_diff"]:  # the matrix holds |h| only:
        del new_arrays[key]  # a subset's signed means are not in it, and the source's are not the subset's
    new_arrays.update(abstention_arrays(abstention))  # the subset's own control (stability keeps an item's rows)
    sizes = {c: res[c]["sizes"] for c in categories}
    nulls = {"combined": None, **{c: None for c in categories}}
    new = {**meta, **select_from_arrays(new_arrays, categories, nulls, sizes, opts),
           "data": {**meta["data"], "rows": int(keep.sum()), "subset": note,
                    "pairs": int(keep.sum()) // 2 if opts.contrast in N.PAIRED_CONTRASTS else None},
           "derived_from": {"artifact": str(Path(neurons_dir).absolute()),
                            "hash": artifact.artifact_hash(neurons_dir), "subset": note}}
    with atomic_output_dir(out, force, (Path(neurons_dir),)) as tmp:
        artifact.save(tmp, new, new_arrays)
    return new


def _behavior_rows(runner, tokenizer, items, data_info: dict, opts: IdentifyOptions, progress: bool):
    """Behavior mode: the model answers the ambiguous items; (decision-point spans, row_cat,
    row_label, categories, data info). Refuses (CocoError) before anything is written when a
    category has too few biased or "unknown" answers."""
    from vllm_coco.identify import behavior

    categories = list(dict.fromkeys(it.category for it in items))
    chat = bool(opts.chat and getattr(tokenizer, "chat_template", None))
    xs, ys, counts = [], [], {}
    for cat in categories:  # one category at a time, so a category with too few answers fails early
        cat_items = [it for it in items if it.category == cat]
        logliks = runner.option_logliks(behavior.option_spans(tokenizer, cat_items, chat=opts.chat), progress)
        x, y, c = behavior.contrast_sets(cat_items, behavior.choose(cat_items, logliks, opts.scoring))
        behavior.check_sets(c, opts.split, chat=chat, scoring=opts.scoring)
        xs, ys, counts = xs + x, ys + y, {**counts, **c}
    cat_index = {c: i for i, c in enumerate(categories)}
    spans = (behavior.decision_spans(tokenizer, xs, chat=opts.chat)
             + behavior.decision_spans(tokenizer, ys, chat=opts.chat))
    row_cat = np.array([cat_index[it.category] for it in xs + ys], dtype=np.int32)  # [|X| + |Y|]
    row_label = np.array([0] * len(xs) + [1] * len(ys), dtype=np.int32)  # 0: biased answer, 1: "unknown"
    data_info.update({"answers": counts, "scoring": opts.scoring, "items": len(items), "pairs": None})
    return spans, row_cat, row_label, categories, data_info


class _HFRunner:
    """identify's model on a transformers forward (capture.py's hooks); `engine_capture.EngineCapture`
    is the same interface inside a vLLM engine (--backend vllm)."""

    def __init__(self, model_dir: Path, opts: IdentifyOptions):
        self.model, self.tokenizer = load_model(model_dir, opts.dtype, opts.device, opts.device_map)
        self.opts = opts

    def close(self) -> None:
        self.model = None

    def option_logliks(self, spans, progress: bool = False) -> np.ndarray:
        from vllm_coco.identify import behavior

        return behavior.option_logliks(self.model, spans, self.opts.batch_size, pad_id=self.tokenizer.pad_token_id,
                                       progress=progress)

    def capture(self, spans, matrix_path: Path, progress: bool = True, row_coef=None):
        from vllm_coco.identify.capture import capture

        return capture(self.model, spans, matrix_path, self.opts.batch_size, pad_id=self.tokenizer.pad_token_id,
                       progress=progress, row_coef=row_coef)

    def weight_norms(self) -> np.ndarray:
        from vllm_coco.core.models import layout_of

        return _weight_norms(self.model, layout_of(self.model))


def _runner(model_dir: Path, opts: IdentifyOptions):
    """(tokenizer, the model runner of opts.backend)."""
    if opts.backend == "vllm":
        from vllm_coco.core.models import check_base_model, load_tokenizer
        from vllm_coco.identify.engine_capture import EngineCapture

        check_base_model(model_dir)
        tokenizer = load_tokenizer(model_dir)
        return tokenizer, EngineCapture(model_dir, opts.dtype, opts.engine())
    runner = _HFRunner(model_dir, opts)
    return runner.tokenizer, runner


def _load_data(opts: IdentifyOptions):
    """(items for behavior mode, or (pairs, abstention-control pairs), data info)."""
    if opts.contrast == "behavior":
        return contrast.load_items(opts.data, opts.categories, opts.split, opts.limit, opts.seed)
    if opts.contrast == "stereotype":
        pairs, control, info = contrast.load_stereotype(opts.data, opts.categories, opts.split, opts.limit, opts.seed)
        return (pairs, control if opts.abstention_filter else []), info
    pairs, info = contrast.load_contrast(opts.data, opts.categories, opts.split, opts.limit, opts.seed)
    return (pairs, []), info


def _pair_rows(tokenizer, pairs, control, data_info: dict, opts: IdentifyOptions):
    """Paired modes: two rows per pair, biased then unbiased, and after them the abstention control's
    rows, named then unknown (names.ROW_*); (spans, row_cat, row_label, categories, data info)."""
    from vllm_coco.identify.capture import response_spans

    categories = list(dict.fromkeys(p.category for p in pairs))
    cat_index = {c: i for i, c in enumerate(categories)}
    spans = response_spans(tokenizer, pairs, chat=opts.chat) + response_spans(tokenizer, control, chat=opts.chat)
    row_cat = np.repeat([cat_index[p.category] for p in pairs + control], 2).astype(np.int32)  # [2 * pairs]
    row_label = np.concatenate([np.tile([N.ROW_BIASED, N.ROW_UNBIASED], len(pairs)),
                                np.tile([N.ROW_NAMED, N.ROW_UNKNOWN], len(control))]).astype(np.int32)
    data_info["pairs"] = len(pairs)
    if control:
        data_info["abstention_pairs"] = len(control)
    return spans, row_cat, row_label, categories, data_info


def abstention_losses(matrix, row_cat: np.ndarray, row_label: np.ndarray, categories, opts: IdentifyOptions,
                      progress: bool = False) -> dict[str, np.ndarray] | None:
    """Per category, each neuron's COCO loss on the abstention control's rows ("unknown" vs a named
    answer, docs/METHOD.md §5.6), scored like the contrast (no null); None when the rows have none."""
    named, unknown = (row_label == N.ROW_NAMED) & (row_cat >= 0), (row_label == N.ROW_UNKNOWN) & (row_cat >= 0)
    if not named.any():
        return None
    label = np.where(named, N.ROW_BIASED, np.where(unknown, N.ROW_UNBIASED, -1))
    res = score_matrix(matrix, row_cat, label, categories, replace(opts, null_rounds=0), progress)
    return {c: res[c]["loss"] for c in categories}


def abstention_arrays(abstention: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """neurons.safetensors' abstention-control arrays: combined (the mean over categories, as §5.2
    combines the contrast's losses) and per category; none without a control."""
    if abstention is None:
        return {}
    return {"abstention_loss": np.mean(list(abstention.values()), axis=0),
            **{f"abstention_loss.{c}": loss for c, loss in abstention.items()}}


def _per_neuron_arrays(cap, weight_norm, res, abstention, categories, row_cat, row_label) -> dict[str, np.ndarray]:
    """neurons.safetensors' arrays (core/artifact.py) from the capture and the scores."""
    la = cap.layout.arrays()
    mean = lambda key: np.mean([res[c][key] for c in categories], axis=0)  # noqa: E731 (combined: §5.2)
    arrays = {
        "layer": la["layer"].astype(np.int32), "proj": la["proj"].astype(np.int32),
        "index": la["index"].astype(np.int32),
        "loss": mean("loss"), "score": mean("score"), "direction": mean("direction").astype(np.float32),
        "calib_mean": cap.calib_mean.astype(np.float32), "calib_std": cap.calib_std.astype(np.float32),
        "act_mean": cap.act_mean.astype(np.float32), "mean_diff": cap.contrast.mean(0).astype(np.float32),
        "mean_intensity": cap.mean_intensity.astype(np.float32), "weight_norm": weight_norm.astype(np.float32),
        "row_category": row_cat, "row_label": row_label,
    }
    for ci, cat in enumerate(categories):
        for key in ("loss", "score"):
            arrays[f"{key}.{cat}"] = res[cat][key]
        for key in ("direction", "mean_intensity"):
            arrays[f"{key}.{cat}"] = res[cat][key].astype(np.float32)
        arrays[f"mean_diff.{cat}"] = cap.contrast[ci].astype(np.float32)
    return arrays | abstention_arrays(abstention)


def identify(model: str, out: str, opts: IdentifyOptions, force: bool = False, progress: bool = True) -> dict:
    """Run the whole identify job; returns the written neurons.json content."""
    from vllm_coco.identify.capture import open_matrix

    t0 = time.time()
    opts.validate()
    model_dir = resolve_model_dir(model)
    data_path = Path(opts.data).expanduser()
    sources = (model_dir,) + ((data_path,) if data_path.exists() else ())
    check_output_dir(out, force, sources)
    config = read_config(model_dir)
    data, data_info = _load_data(opts)
    tokenizer, runner = _runner(model_dir, opts)
    with closing(runner):
        if opts.contrast == "behavior":
            rows = _behavior_rows(runner, tokenizer, data, data_info, opts, progress)
        else:
            rows = _pair_rows(tokenizer, *data, data_info, opts)
        spans, row_cat, row_label, categories, data_info = rows
        chat_template = bool(opts.chat and getattr(tokenizer, "chat_template", None))
        fp = fingerprint(model_dir)
        with atomic_output_dir(out, force, sources) as tmp:
            cap = runner.capture(spans, tmp / artifact.MATRIX_FILE, progress=progress,
                                 row_coef=mean_diff_coef(row_cat, row_label, len(categories)))
            t_capture = time.time() - t0
            weight_norm = runner.weight_norms()
            runner.close()  # scoring needs the memory
            matrix = open_matrix(tmp / artifact.MATRIX_FILE)
            res = score_matrix(matrix, row_cat, row_label, categories, opts, progress)
            check_scores_rank(np.mean([res[c]["loss"] for c in categories], axis=0), opts.tau)
            abstention = abstention_losses(matrix, row_cat, row_label, categories, opts, progress)
            arrays = _per_neuron_arrays(cap, weight_norm, res, abstention, categories, row_cat, row_label)
            nulls = {"combined": float(np.mean([res[c]["null_score"] for c in categories], axis=0).max())
                     if opts.null_rounds else None}
            nulls.update({c: float(res[c]["null_score"].max()) if opts.null_rounds else None for c in categories})
            sizes = {c: res[c]["sizes"] for c in categories}
            meta = {
                "method": METHOD_VERSION,
                "tool": f"vllm-coco {__version__}",
                "model": {"path": str(model_dir), "architecture": (config.get("architectures") or ["?"])[0],
                          **cap.layout.to_json(), "num_neurons": cap.layout.total, "fingerprint": fp,
                          "dtype": opts.dtype},
                "data": {**data_info, "contrast": opts.contrast, "chat_template": chat_template, "rows": cap.rows,
                         "tokens": cap.tokens, "calibration_tokens": cap.span_tokens},
                "categories": categories,
                "capture": {"backend": opts.backend, **opts.engine()},
                **select_from_arrays(arrays, categories, nulls, sizes, opts),
                "timing_s": {"capture": round(t_capture, 2), "total": round(time.time() - t0, 2)},
            }
            artifact.save(tmp, meta, arrays)
    return meta
