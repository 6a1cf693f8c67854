"""`coco-tools generate`: high-throughput batch generation through vLLM's offline engine.

Input JSONL, one request per line: {"prompt": "..."} or {"messages": [{"role": ..., "content": ...}]}
(other keys are carried through). Output JSONL in the same order, each input object plus
"output" (the text) and "output_tokens". NE-COCO directories work through the plugin, LE-baked
ones as plain checkpoints, and `--lora DIR` applies an adapter to every request. With an NE
directory a line may carry its own edit (keys coco_alpha / coco_beta / coco_lam / coco_edit /
coco_scale, as a server request's vllm_xargs): such requests share batches with the others
(serve/per_request.py).
"""

from __future__ import annotations

# Lazy imports: vLLM, numpy are imported inside the functions that use them (directly or through the
# modules they import), so importing this module stays light.
import contextlib
import io
import json
import os
import time
from pathlib import Path

from vllm_coco.core.atomic import check_output_file, made_parents, write_text
from vllm_coco.core.engine import shutdown
from vllm_coco.core.errors import CocoError, held_stderr
from vllm_coco.core.json_file import read_config
from vllm_coco.core.names import NE_EDIT, XARG_ALPHA, XARG_EDIT
from vllm_coco.data.contrast import read_jsonl
from vllm_coco.serve.launch import engine_kwargs as per_request_kwargs
from vllm_coco.serve.request_settings import Menu, looks_coco


def _is_request(obj) -> bool:
    """{"prompt": str} or {"messages": [{"content": str, ...}, ...]} (at least one message)."""
    if not isinstance(obj, dict):
        return False
    if "messages" not in obj:
        return isinstance(obj.get("prompt"), str)
    msgs = obj["messages"]
    return isinstance(msgs, list) and bool(msgs) and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                         for m in msgs)


def read_requests(path: Path) -> tuple[list[dict], list[int]]:
    """The requests and their line numbers in the file (blank lines are skipped), the whole file
    validated before any engine starts."""
    if not Path(path).is_file():
        raise CocoError(f"prompts file {path} does not exist; pass a JSONL file with one {{\"prompt\": ...}} per line")

    requests, lines = [], []
    for lineno, obj in read_jsonl(path):
        if not _is_request(obj):
            raise CocoError(f'{path}:{lineno}: expected {{"prompt": "..."}} or {{"messages": [{{"role": ..., '
                            f'"content": "..."}}, ...]}} (text content, at least one message)')
        requests.append(obj)
        lines.append(lineno)
    if not requests:
        raise CocoError(f"{path} holds no requests")
    return requests, lines


def engine_kwargs(model: str, extra: list[str]) -> dict:
    """vLLM engine arguments the user set among `extra` (vLLM's own CLI flags, forwarded as is)."""
    if not extra:
        return {}
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser(prog="coco-tools generate"))
    defaults = vars(parser.parse_args(["--model", model]))
    usage = io.StringIO()
    try:
        with contextlib.redirect_stderr(usage):  # argparse prints its whole usage (250 lines), then exits
            given = vars(parser.parse_args(["--model", model, *extra]))
    except SystemExit:
        why = [line.split("error:", 1)[1].strip() for line in usage.getvalue().splitlines() if "error:" in line]
        raise CocoError(f"engine arguments {' '.join(extra)}: {why[-1] if why else 'not understood'}; "
                        "see `vllm serve --help`") from None
    return {k: v for k, v in given.items() if k != "model" and v != defaults.get(k)}


def request_settings(model_dir: Path, requests: list[dict], prompts, alpha: float | None,
                     lines: list[int] | None = None) -> list[dict] | None:
    """Each request's coco_* settings (with `alpha` as the gate strength of lines that set none),
    all checked before any engine starts; None when no line and no --alpha asks for any."""
    per_line = [{k: v for k, v in r.items() if looks_coco(k)} for r in requests]  # COCO_ALPHA too: refused
    if alpha is None and not any(per_line):
        return None
    from vllm_coco.core.ne_format import is_ne

    if not is_ne(read_config(model_dir)):
        raise CocoError(f"per-request NE-COCO settings (--alpha, coco_* keys) need an NE-COCO directory and "
                        f"{model_dir} is not one; export one with `coco-tools ne`, or drop them")

    menu = Menu.read(model_dir)
    for lineno, args in zip(lines or range(1, len(per_line) + 1), per_line):
        where = f"{prompts}:{lineno}" if args else "--alpha"
        if alpha is not None and XARG_ALPHA not in args and args.get(XARG_EDIT, NE_EDIT) == NE_EDIT:
            args[XARG_ALPHA] = alpha
        try:
            menu.parse(args)
        except ValueError as exc:
            raise CocoError(f"{where}: {exc}") from None
    return per_line


def _messages(request: dict) -> list[dict]:
    """The conversation of a request (read_requests has checked it): its messages, or its prompt as one user turn."""
    return request["messages"] if "messages" in request else [{"role": "user", "content": request["prompt"]}]


def prompt_of(tokenizer, request: dict, chat: bool, where: str) -> tuple[list[int] | str, int]:
    """(what the engine gets, its length in tokens). With the model's chat template (and `chat`): the
    token ids of the rendered conversation, which already holds any special tokens; otherwise the
    plain text, which the engine tokenizes as here (with the tokenizer's special tokens)."""
    if chat and getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(_messages(request), tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # the model's own template: a jinja syntax error, raise_exception(), bad types
            why = (str(exc).strip().splitlines() or [""])[0][:160]
            raise CocoError(f"{where}: the model's chat template fails ({type(exc).__name__}: {why}); fix its "
                            "chat_template (chat_template.jinja or tokenizer_config.json), or pass --no-chat") from None
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        return ids, len(ids)
    text = request["prompt"] if isinstance(request.get("prompt"), str) else "\n".join(
        m["content"] for m in request["messages"])
    return text, len(tokenizer(text)["input_ids"])


def check_length(count: int, limit: tuple[int, str] | None, where: str) -> None:
    """A prompt the engine takes: at least one token, and room for at least one generated token
    within `limit` = (context length in tokens, where that number comes from)."""
    if count == 0:
        raise CocoError(f"{where}: the prompt is empty (no tokens); give it some text, or drop the line")
    if limit is not None and count >= limit[0]:
        raise CocoError(f"{where}: the prompt is {count} tokens, and the model's context is {limit[0]} "
                        f"({limit[1]}), which leaves no room to generate; shorten the prompt")


# config.json keys vLLM derives the context length from (the smallest wins; model_max_length overrides)
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_target_positions",
                 "max_sequence_length", "max_seq_length", "seq_len")


def _rope_factor(cfg: dict) -> float:
    """The largest RoPE scaling factor in config.json (1 if none): vLLM stretches the context by it."""
    found = []

    def walk(v):
        if isinstance(v, dict):
            f = v.get("factor")
            found.append(f if isinstance(f, (int, float)) and not isinstance(f, bool) and f > 1 else 1)
            for x in v.values():
                walk(x)

    walk(cfg.get("rope_parameters"))
    walk(cfg.get("rope_scaling"))
    return max(found, default=1)


def _config_context(model_dir: Path) -> tuple[int, str] | None:
    """(tokens, where from) of the context vLLM derives from config.json, or an upper bound of it
    (vLLM may lower it further, e.g. by the tokenizer's model_max_length); None: config.json names none."""
    cfg = read_config(model_dir)
    given = {k: cfg[k] for k in (*_CONTEXT_KEYS, "model_max_length")
             if isinstance(cfg.get(k), int) and not isinstance(cfg.get(k), bool) and cfg[k] > 0}
    if not given:
        return None
    key = "model_max_length" if "model_max_length" in given else min(given, key=given.get)
    return int(given[key] * _rope_factor(cfg)), f"{key} in {model_dir}/config.json"


def context_limit(model_dir: Path, max_model_len: int | None) -> tuple[int, str] | None:
    """(tokens, where from) of the context the engine will have, or an upper bound of it, so that the
    checks before the engine starts refuse only what the engine would refuse. None: not known here."""
    derived = _config_context(model_dir)
    if max_model_len is None:
        return derived
    allow_long = os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "0").strip().lower() in ("1", "true")  # as vLLM
    if derived is not None and max_model_len > derived[0] and not allow_long:
        raise CocoError(f"--max-model-len {max_model_len} is more than the model's context of {derived[0]} tokens "
                        f"({derived[1]}); pass at most {derived[0]}")
    return max_model_len, "--max-model-len"


def check_prompts(tokenizer_dir: Path, requests: list[dict], where: list[str], chat: bool,
                  limit: tuple[int, str] | None) -> None:
    """Render and count every prompt as the engine will, before it starts: a broken chat template,
    an empty prompt or one longer than the context is a CocoError naming its line."""
    from vllm_coco.core.models import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    for request, w in zip(requests, where):
        check_length(prompt_of(tokenizer, request, chat, w)[1], limit, w)


def generate(model: str, prompts: str, out: str, *, max_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, chat: bool = True, lora: str | None = None,
             dtype: str = "auto", max_model_len: int | None = None, extra: list[str] = (),
             force: bool = False, alpha: float | None = None) -> dict:
    """Generate for every request in `prompts`, write `out` atomically; returns throughput figures."""
    from vllm_coco.core.checks import finite
    from vllm_coco.core.models import resolve_model_dir

    with held_stderr():  # so a CocoError here is one line, whatever vLLM or transformers printed first
        model_dir = resolve_model_dir(model)
        out_path = check_output_file(out, force, sources=(model_dir, prompts) + ((lora,) if lora else ()))
        finite(temperature, "--temperature", lo=0)
        finite(top_p, "--top-p", lo=0, hi=1, lo_open=True)
        requests, lines = read_requests(Path(prompts))
        if lora and not (Path(lora) / "adapter_config.json").is_file():
            raise CocoError(f"--lora {lora} is not a LoRA adapter directory (no adapter_config.json)")
        settings = request_settings(model_dir, requests, prompts, alpha, lines)
        kwargs = engine_kwargs(str(model_dir), list(extra))
        if settings is not None:
            kwargs.update({k: v for k, v in per_request_kwargs(model_dir).items() if k != "model"})
        if kwargs.get("tokenizer_mode", "auto") in ("auto", "hf", "slow"):  # a tokenizer transformers loads
            check_prompts(Path(kwargs.get("tokenizer") or model_dir), requests, [f"{prompts}:{n}" for n in lines],
                          chat, context_limit(model_dir, max_model_len))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # CPU builds: the default reservation fails on 24 GiB

    from vllm import LLM, SamplingParams

    if lora:
        kwargs.setdefault("enable_lora", True)
        kwargs.setdefault("max_lora_rank", 64)
    llm = LLM(model=str(model_dir), dtype=dtype, seed=seed, max_model_len=max_model_len, **kwargs)
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    if settings is not None:  # one SamplingParams per request, carrying its edit
        params = [params.clone() for _ in requests]
        for p, s in zip(params, settings):
            p.extra_args = s or None
    lora_req = None
    if lora:
        from vllm.lora.request import LoRARequest

        lora_req = LoRARequest("coco", 1, str(Path(lora).absolute()))
    from vllm.inputs import TokensPrompt

    try:
        # the engine's own tokenizer and context length have the last word (the checks above are theirs
        # as transformers and config.json give them, before minutes of engine start-up)
        tokenizer, limit = llm.get_tokenizer(), (llm.model_config.max_model_len, "the engine's max_model_len")
        inputs = []
        for r, n in zip(requests, lines):
            prompt, count = prompt_of(tokenizer, r, chat, f"{prompts}:{n}")
            check_length(count, limit, f"{prompts}:{n}")
            inputs.append(TokensPrompt(prompt_token_ids=prompt) if isinstance(prompt, list) else prompt)
        t0 = time.perf_counter()
        results = llm.generate(inputs, params, use_tqdm=True, lora_request=lora_req)  # order preserved
    finally:
        shutdown(llm)  # now, not in the interpreter's teardown (core/engine.py)
    wall = time.perf_counter() - t0
    n_out = sum(len(r.outputs[0].token_ids) for r in results)
    n_in = sum(len(r.prompt_token_ids) for r in results)

    with made_parents(out_path):
        write_text(out_path, "".join(json.dumps({**req, "output": res.outputs[0].text,
                                                 "output_tokens": len(res.outputs[0].token_ids)}) + "\n"
                                     for req, res in zip(requests, results)), force=force)
    return {"requests": len(requests), "prompt_tokens": n_in, "output_tokens": n_out, "seconds": wall,
            "output_tok_s": n_out / wall if wall else 0.0}
