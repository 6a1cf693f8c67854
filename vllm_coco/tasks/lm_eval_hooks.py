"""Everything the task YAMLs name as `!function utils.NAME`, in one place.

lm-eval imports the `utils.py` next to a YAML by file path; each evals/<folder>/utils.py is the
one line `from vllm_coco.tasks.lm_eval_hooks import *`, so all folders share these objects (one
copy of the logic, from the installed package). `__all__` is exactly the set of names the YAMLs
reference (tests/test_evals.py checks both directions).
"""

from vllm_coco.tasks.abstention import load_abstain, process_abstain
from vllm_coco.tasks.bbq_docs import load_stereo
from vllm_coco.tasks.jailbreak import load_jailbreak
from vllm_coco.tasks.metrics import (
                                     agg_abs_bias_ambig,
                                     agg_abs_bias_disambig,
                                     agg_acc_disambig,
                                     agg_acc_disambig_consistent,
                                     agg_acc_disambig_inconsistent,
                                     agg_bias_ambig,
                                     agg_bias_disambig,
                                     agg_disambig_gap,
                                     agg_order_consistency,
                                     agg_pos0_rate,
                                     agg_pos1_rate,
                                     agg_pos2_rate,
                                     agg_success_rate,
                                     agg_unparsed_rate,
                                     process_gen,
                                     process_jailbreak,
                                     process_mc,
)
from vllm_coco.tasks.retention import agg_bits_per_byte, load_retention, process_reference_ll

__all__ = [
    # custom_dataset
    "load_stereo", "load_jailbreak", "load_retention", "load_abstain",
    # process_results
    "process_mc", "process_gen", "process_jailbreak", "process_reference_ll", "process_abstain",
    # aggregation
    "agg_success_rate", "agg_acc_disambig", "agg_bias_disambig", "agg_bias_ambig", "agg_abs_bias_disambig",
    "agg_abs_bias_ambig", "agg_pos0_rate", "agg_pos1_rate", "agg_pos2_rate", "agg_order_consistency",
    "agg_unparsed_rate", "agg_bits_per_byte", "agg_acc_disambig_consistent", "agg_acc_disambig_inconsistent",
    "agg_disambig_gap",
]
