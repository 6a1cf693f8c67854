"""Run one vLLM engine that takes per-request NE-COCO settings (serve/launch.engine_kwargs) and dump,
as JSON: a mixed batch (every request with its own extra_args, all in one `generate`), and a
prefix-cache sequence (one long prompt sent with several settings in turn, one `generate` each).

    python tests/per_request_worker.py OUT.json SPEC.json

SPEC: {"dir": NE_DIR, "eager": bool, "max_tokens": N, "max_model_len": N (default 512),
       "requests": [{"prompt": [ids], "extra": {...}}], "prefix": {"prompt": [ids], "sequence": [{...}, ...]}}
Run as a subprocess by the tests: vLLM spawns worker processes and wants a __main__ guard.
"""

import json
import sys


def _result(prompt, out) -> dict:
    gen = list(out.outputs[0].token_ids)
    return {"prompt_logprobs": [None] + [d[t].logprob for d, t in zip(out.prompt_logprobs[1:], prompt[1:])],
            "generated": gen,
            "generated_logprobs": [d[t].logprob for d, t in zip(out.outputs[0].logprobs, gen)],
            "num_cached_tokens": out.num_cached_tokens}


def main():
    out_path, spec_path = sys.argv[1:3]
    spec = json.load(open(spec_path))
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_coco.serve.launch import engine_kwargs

    llm = LLM(**engine_kwargs(spec["dir"]), dtype="float32", max_model_len=spec.get("max_model_len", 512), seed=0,
              enforce_eager=spec["eager"], enable_prefix_caching=True)

    def params(extra, prompt_logprobs=0):
        return SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, logprobs=0,
                              prompt_logprobs=prompt_logprobs, extra_args=extra or None)

    reqs = spec["requests"]
    outs = llm.generate([TokensPrompt(prompt_token_ids=r["prompt"]) for r in reqs], [params(r["extra"]) for r in reqs])
    result = {"mixed": [_result(r["prompt"], o) for r, o in zip(reqs, outs)], "prefix": []}
    p = spec["prefix"]["prompt"]
    for extra in spec["prefix"]["sequence"]:
        # prompt logprobs are not asked for here: vLLM recomputes a prompt that asks for them
        o = llm.generate([TokensPrompt(prompt_token_ids=p)], [params(extra, None)])[0]
        result["prefix"].append({"generated": list(o.outputs[0].token_ids), "num_cached_tokens": o.num_cached_tokens,
                                 "generated_logprobs": [d[t].logprob for d, t in
                                                        zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]})
    json.dump(result, open(out_path, "w"))
    from vllm_coco.core.engine import shutdown

    shutdown(llm)  # before exit, not in the interpreter's teardown (core/engine.py)


if __name__ == "__main__":
    main()
