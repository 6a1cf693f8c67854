"""`coco-tools generate`: high-throughput batch generation through vLLM's offline engine.

Input JSONL, one request per line: {"prompt": "..."} or {"messages": [{"role": ..., "content": ...}]}
(other keys are carried through). Output JSONL in the same order, each input object plus
"output" (the text) and "output_tokens". NE-COCO directories work through the plugin, LE-baked
ones as plain checkpoints, and `--lora DIR` applies an adapter to every request. With an NE
directory a line may carry its own edit (keys coco_alpha / coco_beta / coco_lam / coco_edit, as a
server request's vllm_xargs): such requests share batches with the others (serve/per_request.py).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from vllm_coco.core.errors import CocoError


def read_requests(path: Path) -> list[dict]:
    """Validate the whole prompts file before any engine starts (line numbers in errors)."""
    if not Path(path).is_file():
        raise CocoError(f"prompts file {path} does not exist; pass a JSONL file with one {{\"prompt\": ...}} per line")
    from vllm_coco.data.contrast import read_jsonl

    requests = []
    for lineno, obj in read_jsonl(path):
        ok = isinstance(obj, dict) and (isinstance(obj.get("prompt"), str) or (
            isinstance(obj.get("messages"), list) and all(isinstance(m, dict) and "content" in m
                                                          for m in obj["messages"])))
        if not ok:
            raise CocoError(f'{path}:{lineno}: expected {{"prompt": "..."}} or {{"messages": [...]}}')
        requests.append(obj)
    if not requests:
        raise CocoError(f"{path} holds no requests")
    return requests


def engine_kwargs(model: str, extra: list[str]) -> dict:
    """vLLM engine arguments the user set among `extra` (vLLM's own CLI flags, forwarded as is)."""
    if not extra:
        return {}
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser(prog="coco-tools generate"))
    defaults = vars(parser.parse_args(["--model", model]))
    try:
        given = vars(parser.parse_args(["--model", model, *extra]))
    except SystemExit:
        raise CocoError(f"unrecognised engine arguments {' '.join(extra)}; see `vllm serve --help`") from None
    return {k: v for k, v in given.items() if k != "model" and v != defaults.get(k)}


def request_settings(model_dir: Path, requests: list[dict], prompts, alpha: float | None) -> list[dict] | None:
    """Each request's coco_* settings (with `alpha` as the gate strength of lines that set none),
    all checked before any engine starts; None when no line and no --alpha asks for any."""
    from vllm_coco.core.names import NE_EDIT, XARG_ALPHA, XARG_EDIT

    per_line = [{k: v for k, v in r.items() if k.startswith("coco_")} for r in requests]
    if alpha is None and not any(per_line):
        return None
    from vllm_coco.core.models import read_config
    from vllm_coco.core.ne_format import is_ne

    if not is_ne(read_config(model_dir)):
        raise CocoError(f"per-request NE-COCO settings (--alpha, coco_* keys) need an NE-COCO directory and "
                        f"{model_dir} is not one; export one with `coco-tools ne`, or drop them")
    from vllm_coco.serve.request_settings import Menu

    menu = Menu.read(model_dir)
    for lineno, args in enumerate(per_line, 1):
        where = f"{prompts}:{lineno}" if args else "--alpha"
        if alpha is not None and XARG_ALPHA not in args and args.get(XARG_EDIT, NE_EDIT) == NE_EDIT:
            args[XARG_ALPHA] = alpha
        try:
            menu.parse(args)
        except ValueError as exc:
            raise CocoError(f"{where}: {exc}") from None
    return per_line


def generate(model: str, prompts: str, out: str, *, max_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, chat: bool = True, lora: str | None = None,
             dtype: str = "auto", max_model_len: int | None = None, extra: list[str] = (),
             force: bool = False, alpha: float | None = None) -> dict:
    """Generate for every request in `prompts`, write `out` atomically; returns throughput figures."""
    from vllm_coco.core.atomic import check_output_file
    from vllm_coco.core.checks import finite
    from vllm_coco.core.models import resolve_model_dir

    model_dir = resolve_model_dir(model)
    out_path = check_output_file(out, force, sources=(model_dir, prompts) + ((lora,) if lora else ()))
    finite(temperature, "--temperature", lo=0)
    finite(top_p, "--top-p", lo=0, hi=1, lo_open=True)
    requests = read_requests(Path(prompts))
    if lora and not (Path(lora) / "adapter_config.json").is_file():
        raise CocoError(f"--lora {lora} is not a LoRA adapter directory (no adapter_config.json)")
    settings = request_settings(model_dir, requests, prompts, alpha)
    kwargs = engine_kwargs(str(model_dir), list(extra))
    if settings is not None:
        from vllm_coco.serve.launch import engine_kwargs as per_request_kwargs

        kwargs.update({k: v for k, v in per_request_kwargs(model_dir).items() if k != "model"})
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

    tokenizer = llm.get_tokenizer()
    inputs = []
    for r in requests:
        messages = r.get("messages") or [{"role": "user", "content": r["prompt"]}]
        if chat and getattr(tokenizer, "chat_template", None):
            # the template already holds any special tokens: tokenize it as is
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            inputs.append(TokensPrompt(prompt_token_ids=tokenizer(text, add_special_tokens=False)["input_ids"]))
        else:
            inputs.append(r["prompt"] if "prompt" in r else "\n".join(m["content"] for m in messages))
    t0 = time.perf_counter()
    results = llm.generate(inputs, params, use_tqdm=True, lora_request=lora_req)  # order preserved
    wall = time.perf_counter() - t0
    n_out = sum(len(r.outputs[0].token_ids) for r in results)
    n_in = sum(len(r.prompt_token_ids) for r in results)
    from vllm_coco.core.atomic import made_parents, write_text

    with made_parents(out_path):
        write_text(out_path, "".join(json.dumps({**req, "output": res.outputs[0].text,
                                                 "output_tokens": len(res.outputs[0].token_ids)}) + "\n"
                                     for req, res in zip(requests, results)))
    return {"requests": len(requests), "prompt_tokens": n_in, "output_tokens": n_out, "seconds": wall,
            "output_tok_s": n_out / wall if wall else 0.0}
