"""lm-eval's `custom_dataset` interface, shared by every task of the suite.

A YAML's `custom_dataset: !function utils.load_X` is called with the task's metadata as keyword
arguments (YAML `metadata:` merged with TaskManager(metadata=...) / `--metadata`) and must return
a datasets.DatasetDict; our documents are plain dicts built in Python, put in a "test" split.
"""

from __future__ import annotations

# Lazy imports: datasets is imported inside the functions that use it (directly or through the
# modules they import), so importing this module stays light.


def max_items(kwargs) -> int | None:
    """Task metadata `max_items` (a cap on items; None, "" or "none": no cap)."""
    value = kwargs.get("max_items")
    return None if value in (None, "", "none", "None") else int(value)


def to_dataset(docs: list[dict]):
    """docs -> DatasetDict({"test": docs}); an empty list is an error, not an empty task."""
    import datasets  # heavy: only when lm-eval asks for data

    if not docs:
        raise ValueError("no documents (BBQ: the split of this category is empty for this source)")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})
