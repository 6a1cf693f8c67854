"""vLLM's parallelism flags reach the engine (eval, generate, the experiment's config) and are refused
where they cannot apply; identify's --device-map gives the same artifact as one device."""

import json

import numpy as np
import pytest
import yaml
from conftest import run_cli
from safetensors.numpy import load_file


@pytest.fixture()
def tiny_model(planted):
    return planted[0]


def test_eval_forwards_parallel_options_to_lm_evals_vllm_model(tiny_model):
    from vllm_coco.tasks.evaluate import EvalOptions, _lm_for

    opts = EvalOptions(backend="vllm", tensor_parallel_size=2, pipeline_parallel_size=2,
                       distributed_executor_backend="ray")
    name, args, _, _ = _lm_for(tiny_model, opts)
    assert name == "vllm"
    assert {k: args[k] for k in ("tensor_parallel_size", "pipeline_parallel_size", "distributed_executor_backend")} \
        == {"tensor_parallel_size": 2, "pipeline_parallel_size": 2, "distributed_executor_backend": "ray"}
    assert "data_parallel_size" not in args  # at its default: not passed, lm-eval's own default holds
    _, plain, _, _ = _lm_for(tiny_model, EvalOptions(backend="vllm"))
    assert not {"tensor_parallel_size", "pipeline_parallel_size", "enforce_eager"} & set(plain)
    _, eager, _, _ = _lm_for(tiny_model, EvalOptions(backend="vllm", enforce_eager=True))
    assert eager["enforce_eager"] is True


@pytest.mark.parametrize("args, match", [
    (["--backend", "hf", "--tensor-parallel-size", "2"], "--tensor-parallel-size applies to --backend vllm only"),
    (["--backend", "hf-stock", "--distributed-executor-backend", "ray"],
     "--distributed-executor-backend applies to --backend vllm only"),
    (["--backend", "vllm", "--pipeline-parallel-size", "0"], "--pipeline-parallel-size"),
    (["--backend", "vllm", "--distributed-executor-backend", "slurm"], "--distributed-executor-backend"),
    (["--backend", "hf", "--enforce-eager"], "--enforce-eager applies to --backend vllm only"),
])
def test_eval_refuses_parallel_options_that_cannot_apply(tiny_model, tmp_path, args, match):
    code, _, err = run_cli("eval", tiny_model, "--tasks", "stereo_coco_Age", "--limit", "3", "--out",
                           tmp_path / "e", *args)
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "e").exists()


def test_config_parallel_keys(tmp_path, tiny_model):
    from vllm_coco.core.errors import CocoError
    from vllm_coco.experiment import config

    base = {"models": [{"path": str(tiny_model)}], "out": str(tmp_path / "o")}
    cfg = config.validate({**base, "eval": {"backend": "vllm", "tensor_parallel_size": 2,
                                            "distributed_executor_backend": "mp"}})
    assert cfg.eval.tensor_parallel_size == 2 and cfg.eval.pipeline_parallel_size == 1
    with pytest.raises(CocoError, match=r"^eval\.tensor_parallel_size: 2 applies to backend vllm only"):
        config.validate({**base, "eval": {"backend": "hf", "tensor_parallel_size": 2}})
    with pytest.raises(CocoError, match=r"^eval\.distributed_executor_backend: 'slurm' is not one of"):
        config.validate({**base, "eval": {"backend": "vllm", "distributed_executor_backend": "slurm"}})
    with pytest.raises(CocoError, match=r"^identify\.device_map: 'everywhere' is not one of auto"):
        config.validate({**base, "identify": {"device_map": "everywhere"}})
    with pytest.raises(CocoError, match=r"^identify\.backend: 'sglang' is not one of hf, vllm"):
        config.validate({**base, "identify": {"backend": "sglang"}})
    # the pipeline's evaluations carry them with backend vllm, and so does identify inside vLLM
    from vllm_coco.experiment.pipeline import Run, _engine_parallel, eval_options

    assert _engine_parallel(cfg.eval) == {"tensor_parallel_size": 2, "distributed_executor_backend": "mp"}

    run = Run(cfg, tmp_path, echo=lambda _: None)
    run.backend = "vllm"
    opts = eval_options(run, ("stereo_coco",), "test", 3)
    assert opts.parallel() == {"tensor_parallel_size": 2, "distributed_executor_backend": "mp"}


def test_generate_parses_parallel_engine_flags(tiny_model):
    pytest.importorskip("vllm")
    from vllm_coco.serve.generate import engine_kwargs

    got = engine_kwargs(str(tiny_model), ["--tensor-parallel-size", "2", "--pipeline-parallel-size", "2",
                                          "--data-parallel-size", "2", "--distributed-executor-backend", "mp"])
    assert got == {"tensor_parallel_size": 2, "pipeline_parallel_size": 2, "data_parallel_size": 2,
                   "distributed_executor_backend": "mp"}


def test_identify_device_map_gives_the_same_artifact(planted, tmp_path):
    """--device-map auto (accelerate places the layers; on this CPU-only machine all on the CPU, through
    accelerate's hooks) records the same intensities and selects the same neurons as --device cpu."""
    pytest.importorskip("accelerate")
    model, pairs = planted
    outs = {}
    for name, extra in (("one", []), ("map", ["--device-map", "auto"])):
        code, _, err = run_cli("identify", model, "--out", tmp_path / name, "--data", pairs, "--split", "all",
                               "--quiet", "--null-rounds", "0", *extra)
        assert code == 0, err
        outs[name] = (json.loads((tmp_path / name / "neurons.json").read_text()),
                      load_file(str(tmp_path / name / "intensities.safetensors")))
    (m1, i1), (m2, i2) = outs["one"], outs["map"]
    assert [n["index"] for n in m1["neurons"]] == [n["index"] for n in m2["neurons"]]
    for key in i1:
        np.testing.assert_allclose(i1[key], i2[key], atol=1e-6)
    code, _, err = run_cli("identify", model, "--out", tmp_path / "bad", "--data", pairs, "--device-map", "all")
    assert code == 2 and "--device-map" in err


@pytest.mark.parametrize("args, words", [
    (["--tensor-parallel-size", "2"], "need --backend vllm"),
    (["--backend", "vllm", "--device-map", "auto"], "--device-map is for --backend hf"),
    (["--backend", "vllm", "--data-parallel-size", "2"], "--data-parallel-size"),
])
def test_identify_refuses_engine_options_that_cannot_apply(tiny_model, tmp_path, args, words):
    code, _, err = run_cli("identify", tiny_model, "--out", tmp_path / "x", *args)
    assert code == 2 and words in err, err
    assert not (tmp_path / "x").exists()


def test_readme_has_the_multi_node_recipe():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert "## Many GPUs and nodes" in readme
    for flag in ("--tensor-parallel-size", "--pipeline-parallel-size", "--distributed-executor-backend ray",
                 "ray start --head", "--device-map auto"):
        assert flag in readme, flag
    assert yaml  # the config keys are documented in configs/default.yaml (test_pipeline keeps it equal)
