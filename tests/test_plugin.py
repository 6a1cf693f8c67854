"""The vLLM plugin entry point: discoverable, tiny, idempotent."""

import subprocess
import sys
from importlib.metadata import entry_points

import pytest


def test_entry_point_is_installed():
    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("coco") == "vllm_coco.serve.plugin:register"


def test_plugin_module_imports_nothing_heavy():
    code = ("import sys, vllm_coco.serve.plugin; "
            "print([m for m in ('torch', 'transformers', 'vllm') if m in sys.modules])")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"


def test_register_is_idempotent_and_lazy():
    pytest.importorskip("vllm")
    code = """
import sys
from vllm_coco.serve.plugin import register, ARCHITECTURES
register(); register()
from vllm import ModelRegistry
archs = set(ModelRegistry.get_supported_archs())
assert {a.ne_class for a in ARCHITECTURES} <= archs, archs
assert "vllm_coco.serve.vllm_models" not in sys.modules  # registered as "module:Class" strings
from transformers import AutoConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
assert "coco_llama" in CONFIG_MAPPING and "coco_mistral" in CONFIG_MAPPING
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
