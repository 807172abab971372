"""The tiny local lm-eval tasks' dataset: ``tiny.jsonl`` beside this file, read without the network
(``custom_dataset``: lm-eval calls it with the task's metadata; nothing here uses it)."""

import json
import os

import datasets

HERE = os.path.dirname(os.path.abspath(__file__))


def load(**kwargs):
    """``DatasetDict({"test": ...})`` of ``tiny.jsonl`` (question, choices, answer, text, prompt, target)."""
    del kwargs
    with open(os.path.join(HERE, "tiny.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
