"""The identify options a run config's `identify` section and `coco-tools identify` share, declared
once: type, range, default and help (core/schema.py). The command's flags are generated from these
fields (`--null-rounds` is `null_rounds`); the config's section is this one with the run's budget as
its defaults (experiment/config.py); both reach identify/run.py as IdentifyOptions of the same names.
"""

from __future__ import annotations

from pydantic import Field

from vllm_coco.core import names as N
from vllm_coco.core.schema import Choice, Int, Num, Section, Text


class IdentifySettings(Section):
    contrast: Choice(N.CONTRASTS) = Field(N.CONTRASTS[0], description=(
        "response: biased vs unbiased answer teacher-forced, intensities over the answer tokens. "
        "behavior: the model answers each ambiguous item itself; items answered with the biased option "
        "vs with \"unknown\", intensities at the last prompt token (needs >= 10 of each per category). "
        "stereotype: options lettered A-C in three cyclic orders, the answer letter teacher-forced; "
        "the correct option's letter vs the stereotype-consistent option's, ambiguous and disambiguated "
        "items (those whose correct answer is the stereotype-consistent one are left out)."))
    limit: Int(lo=1, null=True) = Field(None, description=(
        "At most N contrast pairs per category (seeded sample); with --contrast behavior, N ambiguous items "
        "per category for the model to answer; with --contrast stereotype, N // 3 items (three pairs each)."))
    ratio: Num(lo=0, hi=1, lo_open=True) = Field(N.RATIO, description="Keep this share of all q/k/v neurons.")
    weighting: Choice(N.WEIGHTINGS) = Field(N.WEIGHTINGS[0], description="Edit weights: |d|/max|d| or d/max|d|.")
    tau: Num(lo=N.TAU_RANGE[0], hi=N.TAU_RANGE[1]) = Field(N.TAU, description="InfoNCE temperature.")
    null_rounds: Int(lo=0) = Field(N.NULL_ROUNDS, description=(
        "Label-permutation rounds for the significance null (0 to skip)."))
    batch_size: Int(lo=1) = Field(N.BATCH_SIZE, description="Contrast rows per forward.")
    dtype: Choice(N.DTYPES) = Field(N.DTYPES[0], description="The dtype the model runs in.")
    device: Text("a torch device name (cpu, cuda, cuda:1)") = Field("cpu", description=(
        "torch device, e.g. cpu, cuda, cuda:1."))
    device_map: Choice(N.DEVICE_MAPS, null=True) = Field(None, description=(
        "Spread a model larger than one device over every visible GPU (and the CPU) with accelerate; "
        "intensities are gathered on the first layer's device, scoring runs on --device."))
    backend: Choice(N.IDENTIFY_BACKENDS) = Field(N.IDENTIFY_BACKENDS[0], description=(
        "Where the intensities are recorded: a transformers forward (hf), or inside a vLLM engine (vllm: the "
        "plugin's attention layers record them, on every tensor / pipeline rank; eager). Same artifact either way."))
