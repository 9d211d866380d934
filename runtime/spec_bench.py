"""Benchmark prompts for speculative decoding (package data) and runners over them.

``data/bench_tasks.json`` holds two sets of chat prompts: *grounded* tasks (rewrite or edit a
given code file, extract from or summarize a given document), whose answers repeat much of the
prompt, and *chat* prompts, whose answers do not. Generation stops at EOS (the natural answer)
or ``gen_len`` tokens; greedy, so plain and speculative runs produce the very same tokens and
their tok/s compare like for like.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
from collections.abc import Sequence
from dataclasses import dataclass

from llama_export.runtime.bench import Runner, generation_figures
from llama_export.runtime.bundle import Model
from llama_export.runtime.errors import InputError
from llama_export.runtime.generate import GenerationStats
from llama_export.runtime.speculative import SpeculativeOptions

CATEGORIES = ("grounded", "chat")


@dataclass(frozen=True)
class Task:
    category: str
    name: str
    ids: list[int]


def task_texts() -> dict[str, list[dict[str, str]]]:
    """The built-in prompts by category: ``[{"name", "chat"}, ...]``."""
    raw = importlib.resources.files("llama_export.runtime").joinpath("data/bench_tasks.json")
    data = json.loads(raw.read_text(encoding="utf-8"))
    return {c: data[c] for c in CATEGORIES}


def builtin_tasks(model: Model, categories: Sequence[str], gen_len: int) -> list[Task]:
    """The prompts of ``categories`` as chat-rendered token ids for ``model``."""
    unknown = set(categories) - set(CATEGORIES)
    if unknown:
        raise InputError(f"--tasks {', '.join(sorted(unknown))} is unknown: use "
                         f"{', '.join(CATEGORIES)}, all or synthetic")
    texts, ctx = task_texts(), model.manifest.max_context
    tasks = []
    for cat in categories:
        for t in texts[cat]:
            ids = model.encode_chat([{"role": "user", "content": t["chat"]}])
            if len(ids) + gen_len > ctx:
                raise InputError(f"task {t['name']} ({len(ids)} tokens) + --gen-len {gen_len} "
                                 f"exceeds the bundle's context {ctx}: lower --gen-len or "
                                 "re-export with a larger --max-seq-len")
            tasks.append(Task(cat, t["name"], ids))
    return tasks


def add_stats(total: GenerationStats, one: GenerationStats) -> None:
    for f in dataclasses.fields(GenerationStats):
        setattr(total, f.name, getattr(total, f.name) + getattr(one, f.name))


def tasks_runner(model: Model, tasks: Sequence[Task], gen_len: int,
                 speculative: SpeculativeOptions | None = None) -> Runner:
    """Greedy answers to every task in turn; figures over all of them (tokens / total time)."""

    def run() -> dict[str, float]:
        total = GenerationStats()
        for task in tasks:
            gen = model.start([task.ids], max_new_tokens=gen_len, speculative=speculative)
            for _ in gen:
                pass
            add_stats(total, gen.stats)
        return generation_figures(total)

    return run


def speculation_label(spec: SpeculativeOptions) -> str:
    return "lookup" if spec.mode == "lookup" else "draft"
