"""Guard on the transformers internals the shared-prefix scorer relies on (tasks/packed_forward.py).

The packed forward builds a `DynamicCache` from per-layer (k, v) tensors (`ddp_cache_data`), reads
each layer's grown KV back from `cache.layers[i].keys / .values`, and hands LlamaModel.forward an
additive 4-D mask (or a per-layer-type mapping of them) that `create_causal_mask` must pass through
as given. None of that is public API: each is fingerprinted here (sha256 of its normalized source,
as tests/test_upstream_guard.py does for vLLM) and exercised, and the installed transformers must lie
in the range pyproject.toml pins. A changed hash means: re-read that function, re-run
tests/test_prefix_lm.py, then record the new hash.
"""

from __future__ import annotations

import hashlib
import inspect
import textwrap
from importlib.metadata import version

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version
from test_upstream_guard import ROOT

GUARDED = {  # "module:qualname" -> sha256, recorded with transformers 5.19.0
    "transformers.cache_utils:DynamicCache.__init__":
        "1e76da5ec033e11baafe140524eec5c77d611b107dd685a10e51022874a65275",
    "transformers.cache_utils:DynamicLayer.update":
        "3fe48b1632f14c258c9aed556a3bcb1e3786bcf54eb53990369944ba54c453f7",
    "transformers.models.llama.modeling_llama:LlamaModel.forward":
        "aa5e80868d38712e92ceb1064d5b89c6c348dccdfb697eb8de0da14675357e5f",
    "transformers.masking_utils:create_causal_mask":
        "08e44eae3326b5d7f4567109119814aad094ab0520276f2839d5c5133f4c2352",
}


def _source_hash(name: str) -> str:
    import importlib

    module, _, qual = name.partition(":")
    obj = importlib.import_module(module)
    for part in qual.split("."):
        obj = getattr(obj, part)
    source = "\n".join(line.rstrip() for line in textwrap.dedent(inspect.getsource(obj)).splitlines())
    return hashlib.sha256((source.strip("\n") + "\n").encode()).hexdigest()


def test_installed_transformers_is_in_the_pinned_range():
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pin = next(Requirement(d) for d in deps if Requirement(d).name == "transformers")
    assert pin.specifier.contains(Version(version("transformers"))), (version("transformers"), str(pin))
    assert any(s.operator in ("<", "<=", "==") for s in pin.specifier), f"{pin}: pin an upper bound"


@pytest.mark.parametrize("name", GUARDED)
def test_internal_is_unchanged(name):
    assert _source_hash(name) == GUARDED[name], (
        f"transformers changed {name}: re-read it against vllm_coco/tasks/packed_forward.py, re-run "
        "tests/test_prefix_lm.py, then record the new hash here")


def test_cache_from_per_layer_kv_reads_back_and_grows():
    """DynamicCache(ddp_cache_data=...) holds the given tensors per layer; an update appends along the
    sequence axis and `layers[i].keys / .values` show the whole path (what path_kv reads)."""
    from transformers import DynamicCache

    k, v = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8)  # [rows, kvh, P, d]
    cache = DynamicCache(ddp_cache_data=[(k, v), (k * 2, v * 2)])
    assert len(cache.layers) == 2 and torch.equal(cache.layers[1].keys, k * 2)
    new_k, new_v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8)  # [rows, kvh, L, d]
    cache.update(new_k, new_v, 0)
    assert torch.equal(cache.layers[0].keys, torch.cat([k, new_k], 2))
    assert torch.equal(cache.layers[0].values, torch.cat([v, new_v], 2))
    assert cache.get_seq_length() == 9
