"""Choose-the-right-candidate tasks built from WordNet, plus a JSONL format for bringing your own.

Every example is a query text and K candidate texts; a shared sentence encoder scores the candidates by
cosine similarity to the query. Tasks differ only in which relation links query and answer, so no task has
parameters of its own. Splits are seeded and leak-free: every query word and synset of a task is used by at
most one example, so nothing in a task's test split is queried in its train split.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache, partial
from pathlib import Path

from .wordnet import (
    ALSO_SEE,
    ANTONYM,
    ATTRIBUTE,
    CAUSE,
    DERIVATION,
    DOMAIN_REGION,
    DOMAIN_TOPIC,
    ENTAILMENT,
    HYPERNYM,
    HYPONYM,
    INSTANCE_HYPERNYM,
    INSTANCE_HYPONYM,
    MEMBER_HOLONYM,
    MEMBER_MERONYM,
    PART_HOLONYM,
    PART_MERONYM,
    PERTAINYM,
    SIMILAR_TO,
    SUBSTANCE_HOLONYM,
    SUBSTANCE_MERONYM,
    VERB_GROUP,
    Synset,
    WordNet,
)

SPLITS = ("train", "validation", "test")
_NON_WORD = re.compile(r"[\W_]+")

NOUN_LABELS = {
    "act": "act or action", "animal": "animal", "artifact": "artifact", "attribute": "attribute",
    "body": "body part", "cognition": "cognition", "communication": "communication", "event": "event",
    "feeling": "feeling", "food": "food", "group": "group", "location": "location", "motive": "motive",
    "object": "natural object", "person": "person", "phenomenon": "phenomenon", "plant": "plant",
    "possession": "possession", "process": "process", "quantity": "quantity", "relation": "relation",
    "shape": "shape", "state": "state", "substance": "substance", "time": "time",
}  # fmt: skip
VERB_LABELS = {
    "body": "bodily care", "change": "change", "cognition": "thinking", "communication": "communication",
    "competition": "competition", "consumption": "eating and drinking", "contact": "touching",
    "creation": "creation", "emotion": "emotion", "motion": "motion", "perception": "perception",
    "possession": "possession", "social": "social activity", "stative": "being or having",
    "weather": "weather",
}  # fmt: skip


@dataclass
class Example:
    """One query, K candidate texts, and the index of the correct candidate."""

    query: str
    candidates: list[str]
    label: int


@dataclass
class Task:
    """A named task with fixed train/validation/test splits."""

    name: str
    held_out: bool
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    description: str = ""

    def split(self, name: str) -> list[Example]:
        """The examples of split ``name`` (train, validation or test)."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        return getattr(self, name)

    @cached_property
    def fingerprint(self) -> str:
        """A short digest of all three splits: cached experts and scores are keyed by it, not by the name alone."""
        rows = [[split, e.query, e.candidates, e.label] for split in SPLITS for e in self.split(split)]
        return hashlib.sha1(json.dumps(rows).encode()).hexdigest()[:10]

    @property
    def num_candidates(self) -> int:
        """K, the number of candidates of every example (0 for an empty task)."""
        for name in SPLITS:
            if self.split(name):
                return len(self.split(name)[0].candidates)
        return 0


def chance_accuracy(task: Task) -> float:
    """Accuracy of uniform guessing: mean 1/K over the test split (over all splits if it is empty)."""
    examples = task.test or task.train + task.validation
    return sum(1 / len(e.candidates) for e in examples) / len(examples) if examples else 0.0


def task_summary(tasks: dict[str, Task] | Iterable[Task]) -> list[dict]:
    """One row per task (name, held_out, split sizes, K, chance accuracy, description), for reports."""
    rows = []
    for task in tasks.values() if isinstance(tasks, dict) else tasks:
        rows.append(
            {
                "name": task.name,
                "held_out": task.held_out,
                "train": len(task.train),
                "validation": len(task.validation),
                "test": len(task.test),
                "num_candidates": task.num_candidates,
                "chance": round(chance_accuracy(task), 4),
                "description": task.description,
            }
        )
    return rows


# ----------------------------------------------------------------------------------------------- JSONL


def save_task_jsonl(task: Task, path: str | os.PathLike) -> Path:
    """Write a task as JSON lines {split, query, candidates, label}, atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for split in SPLITS:
                for e in task.split(split):
                    row = {
                        "split": split,
                        "query": e.query,
                        "candidates": list(e.candidates),
                        "label": e.label,
                    }
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_task_jsonl(
    path: str | os.PathLike, name: str | None = None, held_out: bool = False, description: str = ""
) -> Task:
    """Read a task written by :func:`save_task_jsonl` (or by hand); errors name the offending line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file not found: {path}")
    splits: dict[str, list[Example]] = {s: [] for s in SPLITS}
    k: int | None = None
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error.msg})") from None
            split, example = _parse_row(row, where)
            if k is None:
                k = len(example.candidates)
            elif len(example.candidates) != k:
                raise ValueError(
                    f"{where}: {len(example.candidates)} candidates, but earlier lines have {k}; "
                    "every example of a task needs the same number of candidates"
                )
            splits[split].append(example)
    if k is None:
        raise ValueError(f"{path}: no examples (expected one JSON object per line)")
    return Task(
        name or path.stem, held_out, splits["train"], splits["validation"], splits["test"], description
    )


def _parse_row(row: object, where: str) -> tuple[str, Example]:
    """Validate one decoded JSONL row."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object with split, query, candidates, label")
    missing = [f for f in ("split", "query", "candidates", "label") if f not in row]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
    split, query, candidates, label = row["split"], row["query"], row["candidates"], row["label"]
    if split not in SPLITS:
        raise ValueError(f"{where}: split must be one of {', '.join(SPLITS)}, got {split!r}")
    if not isinstance(query, str) or not query.strip():
        raise ValueError(f"{where}: query must be a non-empty string")
    if not isinstance(candidates, list) or len(candidates) < 2:
        raise ValueError(f"{where}: candidates must be a list of at least 2 strings")
    if not all(isinstance(c, str) and c.strip() for c in candidates):
        raise ValueError(f"{where}: every candidate must be a non-empty string")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(candidates):
        raise ValueError(
            f"{where}: label must be an integer index in [0, {len(candidates) - 1}], got {label!r}"
        )
    return split, Example(query, list(candidates), label)


# ------------------------------------------------------------------------------------------- building


@lru_cache(maxsize=1 << 18)
def _norm(text: str) -> str:
    """Lower case with single spaces: the form in which candidate texts are compared."""
    return " ".join(text.lower().split())


def _short(text: str, max_words: int = 12) -> str:
    """The first clause of a definition, at most ``max_words`` words."""
    words = text.split(";")[0].split()
    return " ".join(words[:max_words]).rstrip(",:")


def _overlaps(a: str, b: str) -> bool:
    """True when two words share a token or one contains the other (too easy as a pair)."""
    a, b = _norm(a), _norm(b)
    return a in b or b in a or bool(set(a.split()) & set(b.split()))


def _contains_word(text: str, word: str) -> bool:
    """True when some word of ``text`` starts with ``word`` (case-insensitive, punctuation ignored)."""
    return f" {_NON_WORD.sub(' ', word.lower()).strip()}" in " " + _NON_WORD.sub(" ", text.lower())


def _word_keys(*words: str) -> tuple[str, ...]:
    return tuple(f"w:{_norm(w)}" for w in words)


@dataclass
class _Item:
    query: str
    answer: str
    keys: tuple[str, ...]  # each query word / synset may be used by one example only (no split leakage)
    group: str = ""  # distractors come from the same group's answers first
    invalid: Callable[[], set[str]] | None = None  # normalised texts that would also be correct (lazy)
    choices: list[str] | None = None  # item-specific distractor pool (replaces the task pools)


Pools = dict[str, list[str]]  # group -> answer space ("" = the whole task)


class _Context:
    """A WordNet with memoised look-ups shared by the task builders."""

    def __init__(self, wn: WordNet):
        self.wn = wn
        self._ancestors: dict[str, frozenset[str]] = {}
        self._norms: dict[str, frozenset[str]] = {}
        taxon = {s.id for s in wn.senses("taxonomic group", "n")}
        self._taxon = taxon

    def ancestors(self, synset: Synset) -> frozenset[str]:
        """Ids of all (instance) hypernyms, transitively."""
        cached = self._ancestors.get(synset.id)
        if cached is None:
            self._ancestors[synset.id] = frozenset()  # guards against cycles
            out: set[str] = set()
            for parent in self.wn.related(synset, HYPERNYM, INSTANCE_HYPERNYM):
                out.add(parent.id)
                out |= self.ancestors(parent)
            cached = self._ancestors[synset.id] = frozenset(out)
        return cached

    def with_ancestors(self, synsets: Iterable[Synset]) -> list[Synset]:
        """The synsets followed by all their ancestors, without repeats."""
        ids: dict[str, None] = {}
        for s in synsets:
            ids[s.id] = None
            ids.update(dict.fromkeys(sorted(self.ancestors(s))))
        return [self.wn[i] for i in ids]

    def norms(self, synsets: Iterable[Synset]) -> set[str]:
        """Normalised lemmas of the synsets."""
        out: set[str] = set()
        for s in synsets:
            cached = self._norms.get(s.id)
            if cached is None:
                cached = self._norms[s.id] = frozenset(_norm(lemma) for lemma in s.lemmas)
            out |= cached
        return out

    def taxonomic(self, synset: Synset) -> bool:
        """A biological taxon (genus, family, ...), too obscure for a zero-shot encoder."""
        name = synset.name.lower()
        if name.split()[0] in _RANKS or name.endswith(_TAXON_SUFFIXES):
            return True
        return synset.id in self._taxon or bool(self.ancestors(synset) & self._taxon)

    def heads(self, synset: Synset) -> list[Synset]:
        """The cluster head(s) of an adjective synset (itself when it is a head)."""
        if synset.pos == "a":
            return [synset]
        return [h for h in self.wn.related(synset, SIMILAR_TO) if h.pos == "a"]


_RANKS = set(
    "kingdom subkingdom phylum subphylum division class subclass order suborder family subfamily genus "
    "subgenus tribe superfamily superorder".split()
)
_TAXON_SUFFIXES = tuple("idae aceae ales inae oidea phyta mycetes mycota phyceae viridae".split())


# -------------------------------------------------------------------------------------- task builders


def _supersense(ctx: _Context, pos: str, labels: dict[str, str]) -> tuple[list[_Item], Pools]:
    items = []
    for s in ctx.wn.all(pos):
        label = labels.get(s.lexname.split(".", 1)[1])
        if label and s.tagged and s.definition:
            query = f"{s.name}: {_short(s.definition, 20)}"
            items.append(_Item(query, label, (s.id, *_word_keys(s.name))))
    return items, {"": list(labels.values())}


def _definition_to_word(ctx: _Context) -> list[_Item]:
    items = []
    for s in ctx.wn.all():
        tokens = [t for t in _NON_WORD.sub(" ", s.name).split() if len(t) >= 4] or [s.name]
        if (
            s.tagged
            and s.definition
            and s.pos != "r"
            and not any(_contains_word(s.definition, t) for t in tokens)
        ):
            invalid = partial(ctx.norms, [s])
            items.append(
                _Item(_short(s.definition, 20), s.name, (s.id, *_word_keys(s.name)), s.lexname, invalid)
            )
    return items


def _hypernym(
    ctx: _Context, pos: str, template: str, symbol: str = HYPERNYM, tagged: bool = True
) -> list[_Item]:
    def invalid(word: str) -> set[str]:
        return ctx.norms(ctx.with_ancestors(ctx.wn.senses(word, pos))) | {_norm(word)}

    items = []
    for s in ctx.wn.all(pos):
        parents = ctx.wn.related(s, symbol)
        if parents and (s.tagged or not tagged) and _norm(parents[0].name) != _norm(s.name):
            keys = (s.id, *_word_keys(s.name))
            items.append(
                _Item(template.format(s.name), parents[0].name, keys, s.lexname, partial(invalid, s.name))
            )
    return items


def _antonym(ctx: _Context) -> list[_Item]:
    wn = ctx.wn

    def invalid(word: str) -> set[str]:
        out = {_norm(word)}
        for sense in wn.senses(word, "a"):
            out |= ctx.norms([sense])
            for _, target, _ in wn.lexical(sense, ANTONYM):
                out |= ctx.norms([target, *wn.related(target, SIMILAR_TO, ALSO_SEE)])
        return out

    items = []
    for s in wn.all("a"):
        for word, target, opposite in wn.lexical(s, ANTONYM):
            keys = (s.id, target.id, *_word_keys(word, opposite))
            items.append(_Item(f"the opposite of {word}", opposite, keys, "", partial(invalid, word)))
    return items


def _sense_choice(ctx: _Context) -> list[_Item]:
    items = []
    for lemma, pos, senses in ctx.wn.index():
        if pos not in "nv" or len(senses) < 4 or " " in lemma:
            continue
        definitions = {s.id: _short(s.definition, 12) for s in senses if s.definition}
        for s in senses:
            examples = [e for e in s.examples if _contains_word(e, lemma[: max(3, len(lemma) - 2)])]
            if not examples or s.id not in definitions:
                continue
            answer = definitions[s.id]
            # verb groups join near-identical senses: never offer one as a wrong answer for another
            grouped = {s.id, *(g.id for g in ctx.wn.related(s, VERB_GROUP))}
            others = {_norm(d): d for i, d in definitions.items() if i not in grouped}
            others.pop(_norm(answer), None)
            if len(others) >= 3:
                query = f"{lemma}: {_short(examples[0], 20)}"
                items.append(_Item(query, answer, (s.id, *_word_keys(lemma)), choices=list(others.values())))
    return items


def _domain_topic(ctx: _Context, min_members: int = 10) -> tuple[list[_Item], Pools]:
    wn = ctx.wn
    members: dict[str, int] = {}
    for s in wn.all():
        for t in dict.fromkeys(t.id for t in wn.related(s, DOMAIN_TOPIC)):
            members[t] = members.get(t, 0) + 1
    topics = [wn[t] for t, n in members.items() if n >= min_members]
    topic_ancestors = {t.id: ctx.ancestors(t) for t in topics}

    def invalid(word: str) -> set[str]:
        correct = {t.id for sense in wn.senses(word) for t in wn.related(sense, DOMAIN_TOPIC)}
        out = ctx.norms(ctx.with_ancestors(wn[i] for i in sorted(correct)))
        return out | {_norm(word)} | {_norm(t.name) for t in topics if topic_ancestors[t.id] & correct}

    items = []
    for s in wn.all():
        domains = [t for t in wn.related(s, DOMAIN_TOPIC) if t.id in topic_ancestors]
        if domains and _norm(domains[0].name) not in _norm(s.name):
            keys = (s.id, *_word_keys(s.name))
            items.append(_Item(f"{s.name} is a term in", domains[0].name, keys, "", partial(invalid, s.name)))
    return items, {"": list(dict.fromkeys(t.name for t in topics))}


def _domain_region(ctx: _Context) -> list[_Item]:
    """Word -> the region it is used in or about; regions containing or inside a correct one are invalid."""
    wn = ctx.wn

    def invalid(word: str) -> set[str]:
        correct = [t for sense in wn.senses(word) for t in wn.related(sense, DOMAIN_REGION)]
        up = wn.closure(correct, PART_HOLONYM, MEMBER_HOLONYM)
        down = wn.closure(correct, PART_MERONYM, MEMBER_MERONYM)
        return ctx.norms([*correct, *up, *down]) | {_norm(word)}

    items = []
    for s in wn.all():
        regions = wn.related(s, DOMAIN_REGION)
        if regions and not _overlaps(s.name, regions[0].name):
            keys = (s.id, *_word_keys(s.name))
            query = f"{s.name} is a term used in"
            items.append(_Item(query, regions[0].name, keys, "", partial(invalid, s.name)))
    return items


def _lexical_pairs(
    ctx: _Context, source_pos: str, symbol: str, target_pos: str, template: str, tagged: bool = False,
    distinct_stems: bool = False,
) -> list[_Item]:  # fmt: skip
    """Items from lexical pointers word -> word.

    Distractors look alike (same first letters as the answer), or, with ``distinct_stems``, only pairs whose
    words start differently are kept (dental -> tooth, not atomic -> atom).
    """
    wn = ctx.wn

    def invalid(word: str) -> set[str]:
        out = {_norm(word)}
        for sense in wn.senses(word, source_pos):
            out |= ctx.norms(t for w, t, _ in wn.lexical(sense, symbol) if _norm(w) == _norm(word))
        return out

    items = []
    for s in wn.all(source_pos):
        if tagged and not s.tagged:
            continue
        for word, target, answer in wn.lexical(s, symbol):
            if target.file_pos != target_pos or _norm(answer) == _norm(word):
                continue
            if distinct_stems and (_norm(answer)[:4] == _norm(word)[:4] or _overlaps(answer, word)):
                continue
            group = "" if distinct_stems else _norm(answer)[:3]
            keys = (s.id, *_word_keys(word))
            items.append(_Item(template.format(word), answer, keys, group, partial(invalid, word)))
    return items


def _similar(ctx: _Context) -> list[_Item]:
    wn = ctx.wn

    def invalid(word: str) -> set[str]:
        senses = wn.senses(word, "a")
        heads = [h for sense in senses for h in ctx.heads(sense)]
        see = [t for s in [*senses, *heads] for t in wn.related(s, ALSO_SEE)]
        return ctx.norms([*senses, *heads, *see])

    items = []
    for s in wn.all("s"):
        heads = ctx.heads(s)
        if heads and not _overlaps(s.name, heads[0].name):
            keys = (s.id, *_word_keys(s.name))
            items.append(_Item(f"{s.name} broadly means", heads[0].name, keys, "", partial(invalid, s.name)))
    return items


def _synonym(ctx: _Context) -> tuple[list[_Item], Pools]:
    wn, items, pools = ctx.wn, [], {}
    for s in wn.all():
        if not s.tagged or s.pos == "r":
            continue
        pools.setdefault(s.lexname, {}).update(dict.fromkeys(s.lemmas))
        answers = [lemma for lemma in s.lemmas[1:] if not _overlaps(lemma, s.name)]
        if answers:
            keys = (s.id, *_word_keys(s.name, answers[0]))
            invalid = partial(lambda word: ctx.norms(wn.senses(word)), s.name)
            items.append(_Item(f"another word for {s.name}", answers[0], keys, s.lexname, invalid))
    return items, {group: list(words) for group, words in pools.items()}


def _attribute(ctx: _Context) -> list[_Item]:
    wn = ctx.wn

    def invalid(word: str) -> set[str]:
        heads = [h for sense in wn.senses(word, "a") for h in ctx.heads(sense)]
        return ctx.norms(ctx.with_ancestors(a for h in heads for a in wn.related(h, ATTRIBUTE)))

    items = []
    for s in wn.all("a"):
        attributes = [a for h in ctx.heads(s) for a in wn.related(h, ATTRIBUTE)]
        if attributes and (s.pos == "a" or s.tagged) and not _overlaps(s.name, attributes[0].name):
            keys = (s.id, *_word_keys(s.name))
            query = f"the quality of being {s.name}"
            items.append(_Item(query, attributes[0].name, keys, "", partial(invalid, s.name)))
    return items


_HOLONYMS = (MEMBER_HOLONYM, PART_HOLONYM, SUBSTANCE_HOLONYM)
_MERONYMS = (MEMBER_MERONYM, PART_MERONYM, SUBSTANCE_MERONYM)


def _part_whole(ctx: _Context, templates: dict[str, str], skip_taxa: bool = False) -> list[_Item]:
    """Holonym (part -> whole) and meronym (whole -> part) items; answers true by transitivity are invalid."""
    wn = ctx.wn

    def invalid(word: str, symbol: str) -> set[str]:
        senses = ctx.with_ancestors(wn.senses(word, "n"))
        correct = [t for sense in senses for t in wn.related(sense, symbol)]
        if symbol in _HOLONYMS:
            reach = ctx.with_ancestors(wn.closure(correct, *_HOLONYMS, HYPERNYM, INSTANCE_HYPERNYM))
        else:
            reach = wn.closure(correct, *_MERONYMS, HYPONYM, INSTANCE_HYPONYM)
        return ctx.norms([*senses, *correct, *reach])

    items = []
    for s in wn.all("n"):
        for symbol, template in templates.items():
            targets = wn.related(s, symbol)
            if not targets or _overlaps(targets[0].name, s.name):
                continue
            if skip_taxa and (ctx.taxonomic(targets[0]) or ctx.taxonomic(s)):
                continue
            pair = "p:" + "|".join(sorted([_norm(s.name), _norm(targets[0].name)]))
            keys = (s.id, pair, *_word_keys(s.name))
            items.append(_Item(template.format(s.name), targets[0].name, keys, s.lexname,
                               partial(invalid, s.name, symbol)))  # fmt: skip
    return items


def _entail_cause(ctx: _Context) -> list[_Item]:
    wn = ctx.wn
    templates = {ENTAILMENT: "to {} one must", CAUSE: "to {} is to make something"}

    def invalid(word: str) -> set[str]:
        senses = wn.senses(word, "v")
        correct = [t for sense in senses for t in wn.related(sense, ENTAILMENT, CAUSE)]
        return ctx.norms([*senses, *ctx.with_ancestors(correct)])

    items = []
    for s in wn.all("v"):
        for symbol, template in templates.items():
            targets = wn.related(s, symbol)
            if targets and not _overlaps(targets[0].name, s.name):
                keys = (s.id, *_word_keys(s.name))
                items.append(
                    _Item(template.format(s.name), targets[0].name, keys, "", partial(invalid, s.name))
                )
    return items


def _also_see(ctx: _Context) -> list[_Item]:
    wn = ctx.wn

    def invalid(word: str, pos: str) -> set[str]:
        senses = wn.senses(word, pos)
        related = [t for sense in senses for t in wn.related(sense, ALSO_SEE, SIMILAR_TO, ANTONYM)]
        related += [h for sense in senses for h in ctx.heads(sense)] if pos == "a" else []
        return ctx.norms([*senses, *related, *(x for t in related for x in wn.related(t, SIMILAR_TO))])

    items = []
    for s in [*wn.all("a"), *wn.all("v")]:
        if s.file_pos == "a":
            pairs = [(s.name, t, t.name) for t in wn.related(s, ALSO_SEE)]
        else:
            pairs = wn.lexical(s, ALSO_SEE)
        for word, target, answer in pairs:
            if not _overlaps(word, answer):
                keys = (s.id, target.id, *_word_keys(word, answer))
                invalid_fn = partial(invalid, word, s.file_pos)
                items.append(_Item(f"{word} is related to", answer, keys, s.file_pos, invalid_fn))
    return items


_Builder = Callable[[_Context], "list[_Item] | tuple[list[_Item], Pools]"]

# name -> (held out?, description, builder); held-out tasks use relations that no held-in task uses.
TASKS: dict[str, tuple[bool, str, _Builder]] = {
    "noun_supersense": (False, "noun + definition -> its supersense label (animal, artifact, ...)",
                        lambda c: _supersense(c, "n", NOUN_LABELS)),
    "verb_supersense": (False, "verb + definition -> its supersense label (motion, communication, ...)",
                        lambda c: _supersense(c, "v", VERB_LABELS)),
    "definition_to_word": (False, "definition -> the word it defines, among words of the same supersense",
                           _definition_to_word),
    "noun_hypernym": (False, "noun -> its hypernym (dog -> canine)",
                      lambda c: _hypernym(c, "n", "{} is a kind of")),
    "verb_hypernym": (False, "verb -> its hypernym (stroll -> walk)",
                      lambda c: _hypernym(c, "v", "to {} is a way to")),
    "instance_of": (False, "named entity -> its class (Danube -> river)",
                    lambda c: _hypernym(c, "n", "{} is an instance of", INSTANCE_HYPERNYM, tagged=False)),
    "adj_antonym": (False, "adjective -> its antonym (hot -> cold)", _antonym),
    "sense_choice": (False, "word in an example sentence -> the definition of that sense, among its others",
                     _sense_choice),
    "domain_topic": (False, "word -> the topic domain it is a term of (medicine, law, ...)", _domain_topic),
    "domain_region": (False, "word -> the region it is used in or about (lorry -> United Kingdom)",
                      _domain_region),
    "derivation": (False, "noun -> a derivationally related verb (destruction -> destroy)",
                   lambda c: _lexical_pairs(c, "n", DERIVATION, "v", "verb related to {}", True)),
    "similar_adjective": (False, "specific adjective -> the head adjective of its cluster (scorching -> hot)",
                          _similar),
    "synonym": (False, "word -> another word of the same synset (abscond -> bolt)", _synonym),
    "adverb_pertainym": (False, "adverb -> the adjective it derives from (quickly -> quick)",
                         lambda c: _lexical_pairs(c, "r", PERTAINYM, "a", "{} is the adverb of")),
    "adjective_pertainym": (False, "relational adjective -> its noun (dental -> tooth)",
                            lambda c: _lexical_pairs(c, "a", PERTAINYM, "n", "{} means relating to",
                                                            distinct_stems=True)),
    "attribute": (False, "adjective -> the attribute it is a value of (heavy -> weight)", _attribute),
    "part_whole": (True, "part -> the whole it is a part of (stirrup -> saddle)",
                   lambda c: _part_whole(c, {PART_HOLONYM: "{} is a part of"})),
    "member_group": (True, "member -> the group it belongs to (Iceland -> NATO), no biological taxa",
                     lambda c: _part_whole(c, {MEMBER_HOLONYM: "{} is a member of"}, skip_taxa=True)),
    "substance": (True, "thing <-> the substance it is made of (tile -> clay, clay -> tile)",
                  lambda c: _part_whole(c, {SUBSTANCE_MERONYM: "{} is made of",
                                            SUBSTANCE_HOLONYM: "{} is a material of"})),
    "verb_entailment_cause": (True, "verb -> the verb it entails (snore -> sleep) or causes (kill -> die)",
                              _entail_cause),
    "also_see": (True, "adjective or verb -> a loosely related word (WordNet 'also see')", _also_see),
}  # fmt: skip
TASK_NAMES = tuple(TASKS)


# ------------------------------------------------------------------------------------------- sampling


def _interleave(items: list[_Item]) -> list[_Item]:
    """Round-robin over answers so frequent answers do not dominate (items are already shuffled)."""
    buckets: dict[str, list[_Item]] = {}
    for item in items:
        buckets.setdefault(_norm(item.answer), []).append(item)
    out, queues, depth = [], list(buckets.values()), 0
    while queues:
        queues = [q for q in queues if len(q) > depth]
        out.extend(q[depth] for q in queues)
        depth += 1
    return out


def _sample(pool: Sequence[str], banned: set[str], need: int, rng: random.Random, out: list[str]) -> None:
    """Append texts from ``pool`` to ``out`` (up to ``need`` in all): distinct, not banned once normalised."""
    if len(pool) <= 64:
        options: Iterable[str] = rng.sample(list(pool), len(pool))
    else:
        options = (pool[rng.randrange(len(pool))] for _ in range(need * 30))
    for text in options:
        if len(out) >= need:
            return
        key = _norm(text)
        if key not in banned:
            out.append(text)
            banned.add(key)


def split_sizes(n: int, max_train: int, max_eval: int, min_eval: int = 150) -> tuple[int, int, int]:
    """(train, validation, test) sizes for n items: ~70/15/15, capped, test >= min_eval when n allows."""
    n_test = min(max_eval, max(round(0.15 * n), min(min_eval, round(0.35 * n))))
    n_val = min(n_test, max(round(0.15 * n), min(min_eval, round(0.2 * n))))
    return max(0, min(max_train, n - n_test - n_val)), n_val, n_test


def _finalize(
    name: str, held_out: bool, description: str, items: list[_Item], pools: Pools | None, k: int, seed: int,
    max_train: int, max_eval: int, min_eval: int,
) -> Task:  # fmt: skip
    rng = random.Random(f"{seed}:{name}")
    items = list(items)
    rng.shuffle(items)
    accepted, used = [], set()
    for item in _interleave(items):
        keys = (*item.keys, f"q:{_norm(item.query)}")
        if not any(key in used for key in keys):
            used.update(keys)
            accepted.append(item)
    if pools is None:
        grouped: dict[str, dict[str, None]] = {"": {}}
        for item in items:
            grouped.setdefault(item.group, {})[item.answer] = None
            grouped[""][item.answer] = None
        pools = {group: list(texts) for group, texts in grouped.items()}
    elif "" not in pools:
        pools = {**pools, "": list(dict.fromkeys(t for texts in pools.values() for t in texts))}
    sizes = split_sizes(len(accepted), max_train, max_eval, min_eval)
    chosen: list[tuple[_Item, list[str]]] = []
    for item in accepted:
        if len(chosen) >= sum(sizes):
            break
        banned = (item.invalid() if item.invalid else set()) | {_norm(item.answer)}
        distractors: list[str] = []
        for pool in [item.choices] if item.choices is not None else [pools.get(item.group, []), pools[""]]:
            _sample(pool, banned, k - 1, rng, distractors)
        if len(distractors) == k - 1:
            chosen.append((item, distractors))
    if len(chosen) < sum(sizes):
        sizes = split_sizes(len(chosen), max_train, max_eval, min_eval)
    n_train, n_val, n_test = sizes
    rng.shuffle(chosen)
    parts = {"test": chosen[:n_test], "validation": chosen[n_test : n_test + n_val]}
    parts["train"] = chosen[n_test + n_val : n_test + n_val + n_train]
    splits: dict[str, list[Example]] = {}
    for split, rows in parts.items():
        positions = [i % k for i in range(len(rows))]
        rng.shuffle(positions)
        splits[split] = []
        for (item, distractors), position in zip(rows, positions, strict=True):
            candidates = list(distractors)
            candidates.insert(position, item.answer)
            splits[split].append(Example(item.query, candidates, position))
    return Task(name, held_out, splits["train"], splits["validation"], splits["test"], description)


def build_tasks(
    wn: WordNet,
    seed: int = 0,
    num_candidates: int = 4,
    max_train: int = 1000,
    max_eval: int = 250,
    min_eval: int = 150,
    names: Iterable[str] | None = None,
) -> dict[str, Task]:
    """Build the WordNet tasks (all, or those in ``names``); deterministic for a given seed."""
    if num_candidates < 2:
        raise ValueError("num_candidates must be at least 2")
    wanted = list(TASKS) if names is None else list(dict.fromkeys(names))
    unknown = [n for n in wanted if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s): {', '.join(unknown)}; known: {', '.join(TASKS)}")
    ctx = _Context(wn)
    tasks: dict[str, Task] = {}
    for name in wanted:
        held_out, description, builder = TASKS[name]
        built = builder(ctx)
        items, pools = built if isinstance(built, tuple) else (built, None)
        tasks[name] = _finalize(name, held_out, description, items, pools, num_candidates, seed, max_train,
                                max_eval, min_eval)  # fmt: skip
    return tasks
