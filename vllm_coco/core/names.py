"""Every name the project chooses among, and every default, defined once.

Click choices, config validation, task metadata and docs all derive from these tuples; a value
that is not in its tuple is refused with the tuple in the message. Spellings are the CLI's
(`per-byte`, `ablate-zero`): configs and task metadata use the same strings.
"""

from __future__ import annotations

from enum import IntEnum


class Proj(IntEnum):
    """A q/k/v projection; the value is the code stored in the artifact's `proj` array, and the
    order is the packed order of vLLM's qkv_proj output."""

    q = 0
    k = 1
    v = 2


PROJS = tuple(p.name for p in Proj)  # ("q", "k", "v")

# --- data (docs/METHOD.md §2)
SPLITS = ("identify", "validate", "test")
SPLITS_OR_ALL = SPLITS + ("all",)
EVAL_SPLITS = ("test", "validate")  # the identify split is never evaluated
SPLIT_FRACTIONS = (0.4, 0.2, 0.4)  # identify / validate / test shares of a category's question templates
CONTRASTS = ("response", "behavior", "stereotype")  # docs/METHOD.md §2.4
PAIRED_CONTRASTS = ("response", "stereotype")  # row 2i and 2i + 1 are one pair (the null swaps within it)
# identify's row labels (neurons.safetensors row_label): the two sides of the contrast, and the two sides
# of the abstention control a stereotype-contrast run records for its filter (docs/METHOD.md §5.6)
ROW_BIASED, ROW_UNBIASED, ROW_NAMED, ROW_UNKNOWN = 0, 1, 2, 3
DEFAULT_CATEGORIES = ("Age", "Gender_identity", "Race_ethnicity", "Religion", "Nationality", "SES")
BBQ_CATEGORIES = ("Age", "Disability_status", "Gender_identity", "Nationality", "Physical_appearance",
                  "Race_ethnicity", "Race_x_SES", "Race_x_gender", "Religion", "SES", "Sexual_orientation")
SEED = 0
# The split of question templates is fixed (not --seed): the evaluation's tasks split with it too,
# so no seed can put an identify template into a validate or test set.
SPLIT_SEED = 0

# --- score and selection (§3-§5)
TAU = 0.1
# The temperatures identify takes. Similarities are standardized distances over tau (docs/METHOD.md §3):
# at tau 1e3 they span ~1e-3 and the softmax is nearly flat; far above, every score ties (tau 1e300 did,
# and identify reported success); below 1e-3 exp(-d/tau) underflows to 0 and the top neurons tie at loss 0.
TAU_RANGE = (1e-3, 1e3)
K_NEGATIVES = 256
NULL_ROUNDS = 3
RATIO = 0.01
# "coco" is the COCO selection itself; "diffmean" the steering baseline's layer (docs/METHOD.md §5.4)
BASELINES = ("coco", "rand", "norm", "mact", "diffmean")
CONTROL_BASELINES = ("rand", "norm", "mact")  # the same-count controls an experiment compares against
WEIGHTINGS = ("magnitude", "signed")

# --- edits (§6-§7): the linear edit kinds (le, ablate-zero, ablate-mean, ...) and their settings are
# edit/registry.py's; the NE gate's defaults are here.
NE_ALPHA, NE_BETA, NE_LAM = 1.0, 2.0, 0.5
# Besides the kinds, two names a request or a condition may use: "ne" the gate itself, "base" no edit at all.
NE_EDIT, BASE_EDIT = "ne", "base"

# --- per-request settings (vLLM `SamplingParams.extra_args`, the server's `vllm_xargs`): flat keys,
# because vllm_xargs holds scalars only. A request without them gets the directory's settings.
XARG_EDIT, XARG_ALPHA, XARG_BETA, XARG_LAM = "coco_edit", "coco_alpha", "coco_beta", "coco_lam"
XARG_SCALE = "coco_scale"  # a named edit's strength: gain 1 + scale·(gain - 1), offset scale·offset
XARGS = (XARG_EDIT, XARG_ALPHA, XARG_BETA, XARG_LAM, XARG_SCALE)
# |coco_scale| at most this: far past any useful strength (1 is the edit as exported), and small enough that
# any gain or offset below 1e35 in size stays finite in float32 once scaled (the model computes in float32)
SCALE_MAX = 1e3
F32_MAX = 3.4028234663852886e38  # the largest finite float32: per-request numbers must fit the model's dtype
SALT_PREFIX = "coco:"  # namespaces the prefix-cache salt derived from a setting (never a LoRA name)
PER_REQUEST_ENV = "VLLM_COCO_PER_REQUEST"  # the NE directory whose per-request settings the engine accepts

# --- models and evaluation
DEMO_ARCHS = ("llama", "mistral")  # the demo model as LlamaForCausalLM or its MistralForCausalLM twin
DTYPES = ("float32", "bfloat16", "float16")
SCORINGS = ("sum", "per-byte")  # how a loglikelihood task picks an option (§8)
SCORING = SCORINGS[0]  # the default everywhere: the largest summed log-likelihood (lm-eval's acc rule)
EVAL_BACKENDS = ("hf", "hf-stock", "vllm")  # coco-tools eval; hf is prefix_lm.CocoHFLM, hf-stock lm-eval's HFLM
EVAL_DTYPES = ("float32", "bfloat16")  # --backend hf only
IDENTIFY_BACKENDS = ("hf", "vllm")  # coco-tools identify: a transformers forward, or inside a vLLM engine
BACKENDS = ("auto", "hf", "vllm")  # the pipeline's; `coco-tools eval` also takes a server URL
BATCH_SIZE = 8
# vLLM's parallelism and executor options (engine keyword -> what it is) that `coco-tools eval --backend vllm`
# and `coco-tools run` (eval section) pass through; `coco-tools generate` forwards any engine flag as is.
PARALLEL_OPTIONS = {
    "tensor_parallel_size": "shards every layer over N devices (vLLM --tensor-parallel-size)",
    "pipeline_parallel_size": "splits the layers into N stages on N devices (vLLM --pipeline-parallel-size)",
    "data_parallel_size": "N engine replicas, requests spread over them (lm-eval dispatches them with Ray)",
}
EXECUTOR_BACKENDS = ("mp", "ray", "uni", "external_launcher")  # vLLM --distributed-executor-backend
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's, for `identify --device-map`
MAX_MODEL_LEN = 2048  # context length reserved by the vLLM backend (and the URL backend's truncation)
