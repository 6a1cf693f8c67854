"""lm-eval hooks (`!function utils.NAME`) of this folder: see vllm_coco/tasks/lm_eval_hooks.py."""
from vllm_coco.tasks.lm_eval_hooks import *  # noqa: F401,F403
