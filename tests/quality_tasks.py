"""Tiny "what kind of thing is it" tasks shared by the quality-benchmark tests (encoder, causal, reuse)."""

from __future__ import annotations

import random

from benchmarks.quality.tasks import Example, Task

WORDS = {
    "animal": ["dog", "cat", "horse", "sparrow", "trout", "wolf", "cow", "eagle"],
    "food": ["bread", "cheese", "apple", "soup", "rice", "cake", "butter", "pasta"],
    "tool": ["hammer", "saw", "wrench", "drill", "chisel", "shovel", "rake", "pliers"],
    "colour": ["red", "blue", "green", "yellow", "purple", "orange", "brown", "pink"],
}


def category_task(name: str, template: str, seed: int, words: dict[str, list[str]] = WORDS) -> Task:
    """A task whose answer is the category of a word: 16 train, 8 validation, 8 test items."""
    rng = random.Random(seed)
    labels = list(words)
    items = []
    for label, members in words.items():
        for word in members:
            candidates = labels[:]
            rng.shuffle(candidates)
            items.append(Example(query=template.format(word), candidates=candidates, label=candidates.index(label)))
    rng.shuffle(items)
    return Task(name, False, items[:16], items[16:24], items[24:])
