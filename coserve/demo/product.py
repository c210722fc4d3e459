"""The demo's made-up product: training rows, held-out paraphrases, and how answers are scored.

Nothing about the "Quillbeam" lamp exists outside `data/`, so the base model
cannot know it; an answer is right when it contains the fact's keyword.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
TRAIN_FILE = DATA_DIR / "quillbeam_train.jsonl"
HELDOUT_FILE = DATA_DIR / "quillbeam_heldout.jsonl"


@dataclass(frozen=True)
class Fact:
    training_question: str
    paraphrase: str
    answer: str
    keyword: str

    def is_right(self, reply: str) -> bool:
        return self.keyword.lower() in reply.lower()


def load_facts() -> list[Fact]:
    with open(HELDOUT_FILE, encoding="utf-8") as f:
        return [Fact(r["training_question"], r["question"], r["answer"], r["keyword"])
                for r in map(json.loads, f)]


def num_training_rows() -> int:
    with open(TRAIN_FILE, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())
