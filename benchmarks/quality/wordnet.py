"""A small reader for the WordNet 3.0 database files (``data.*``, ``index.*``), as documented in wndb(5).

Only the standard library is used; the whole database (117k synsets) loads in a few seconds.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

DEFAULT_PATH = "/usr/share/wordnet"
FILE_POS = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}
POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}

# lexnames(5WN): used when the database directory has no ``lexnames`` file (Debian's wordnet-base ships none).
WORDNET30_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
    "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
    "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
    "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()

# Pointer symbols from wninput(5WN).
HYPERNYM, INSTANCE_HYPERNYM, HYPONYM, INSTANCE_HYPONYM = "@", "@i", "~", "~i"
ANTONYM, SIMILAR_TO, ALSO_SEE, VERB_GROUP = "!", "&", "^", "$"
ENTAILMENT, CAUSE, ATTRIBUTE, DERIVATION, PERTAINYM, PARTICIPLE = "*", ">", "=", "+", "\\", "<"
MEMBER_HOLONYM, SUBSTANCE_HOLONYM, PART_HOLONYM = "#m", "#s", "#p"
MEMBER_MERONYM, SUBSTANCE_MERONYM, PART_MERONYM = "%m", "%s", "%p"
DOMAIN_TOPIC, DOMAIN_REGION, DOMAIN_USAGE = ";c", ";r", ";u"
MEMBER_TOPIC, MEMBER_REGION, MEMBER_USAGE = "-c", "-r", "-u"

_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")
_QUOTED = re.compile(r'"([^"]*)"')


class Pointer(NamedTuple):
    """A relation from one synset (or one of its words) to another."""

    symbol: str
    target: str  # synset id of the target
    source_word: int = 0  # 1-based word number in the source synset; 0 for a semantic pointer
    target_word: int = 0  # 1-based word number in the target synset; 0 for a semantic pointer

    @property
    def lexical(self) -> bool:
        """True when the pointer links two specific words rather than whole synsets."""
        return self.source_word != 0 or self.target_word != 0


@dataclass
class Synset:
    """One WordNet synset: its words, supersense, gloss and outgoing pointers."""

    id: str  # "<8-digit offset>-<file pos>", e.g. "02084071-n"
    offset: int
    pos: str  # ss_type: n, v, a, s (adjective satellite) or r
    lexname: str  # lexicographer file, e.g. "noun.animal"
    lemmas: list[str]  # underscores replaced by spaces, adjective markers such as "(a)" removed
    definition: str
    examples: list[str]
    pointers: list[Pointer] = field(default_factory=list)
    lex_ids: list[int] = field(default_factory=list)
    tagged: bool = False  # some word has this sense among its semantically tagged (frequent) senses
    _related: dict[str, list[Synset]] | None = field(default=None, repr=False, compare=False)

    @property
    def file_pos(self) -> str:
        """Part of speech of the data file (satellites live in ``data.adj``): n, v, a or r."""
        return "a" if self.pos == "s" else self.pos

    @property
    def name(self) -> str:
        """The first lemma."""
        return self.lemmas[0]

    def targets(self, *symbols: str) -> list[str]:
        """Target synset ids of pointers with any of the given symbols (semantic and lexical)."""
        return [p.target for p in self.pointers if p.symbol in symbols]


class WordNet:
    """All synsets of a WordNet database, with a lemma index in sense order."""

    def __init__(self, synsets: dict[str, Synset], senses: dict[tuple[str, str], list[str]], path: str = ""):
        self.synsets = synsets
        self._senses = senses  # (lower-case lemma, file pos) -> synset ids, most frequent sense first
        self.path = path
        self._by_pos: dict[str, list[Synset]] = {}
        for synset in synsets.values():
            self._by_pos.setdefault(synset.file_pos, []).append(synset)
            if synset.pos == "s":
                self._by_pos.setdefault("s", []).append(synset)

    def __len__(self) -> int:
        return len(self.synsets)

    def __getitem__(self, synset_id: str) -> Synset:
        return self.synsets[synset_id]

    def all(self, pos: str | None = None) -> Iterator[Synset]:
        """Synsets in file order, optionally of one file POS (n, v, a, r) or satellites only (``s``)."""
        yield from self.synsets.values() if pos is None else self._by_pos.get(pos, [])

    def senses(self, lemma: str, pos: str | None = None) -> list[Synset]:
        """Synsets containing ``lemma`` (case-insensitive), most frequent first; all POS when pos is None."""
        key = lemma.lower().replace("_", " ")
        out: list[Synset] = []
        for p in [pos] if pos else ["n", "v", "a", "r"]:
            out.extend(self.synsets[i] for i in self._senses.get((key, "a" if p == "s" else p), []))
        return out

    def index(self) -> Iterator[tuple[str, str, list[Synset]]]:
        """(lower-case lemma, file pos, synsets in sense order) for every indexed word."""
        for (lemma, pos), ids in self._senses.items():
            yield lemma, pos, [self.synsets[i] for i in ids]

    def related(self, synset: Synset, *symbols: str) -> list[Synset]:
        """Synsets reached from ``synset`` by pointers with any of the given symbols (grouped by symbol)."""
        cache = synset._related
        if cache is None:
            cache = synset._related = {}
            for p in synset.pointers:
                target = self.synsets.get(p.target)
                if target is not None:
                    cache.setdefault(p.symbol, []).append(target)
        if len(symbols) == 1:
            return list(cache.get(symbols[0], ()))
        return [t for symbol in symbols for t in cache.get(symbol, ())]

    def lexical(self, synset: Synset, symbol: str) -> list[tuple[str, Synset, str]]:
        """(source lemma, target synset, target lemma) for lexical pointers with ``symbol``."""
        out = []
        for p in synset.pointers:
            if p.symbol != symbol or not p.lexical or p.target not in self.synsets:
                continue
            target = self.synsets[p.target]
            if 0 < p.source_word <= len(synset.lemmas) and 0 < p.target_word <= len(target.lemmas):
                out.append((synset.lemmas[p.source_word - 1], target, target.lemmas[p.target_word - 1]))
        return out

    def closure(self, start: Iterable[Synset], *symbols: str) -> list[Synset]:
        """All synsets reachable from ``start`` by repeatedly following symbols (start only if reached)."""
        seen: dict[str, Synset] = {}
        stack = list(start)
        while stack:
            for target in self.related(stack.pop(), *symbols):
                if target.id not in seen:
                    seen[target.id] = target
                    stack.append(target)
        return list(seen.values())


def split_gloss(gloss: str) -> tuple[str, list[str]]:
    """Split a gloss into its definition and its example sentences (the double-quoted parts)."""
    if '"' not in gloss:
        return "; ".join(p for p in (p.strip() for p in gloss.split(";")) if p), []
    examples = [e.strip() for e in _QUOTED.findall(gloss) if e.strip()]
    rest = _QUOTED.sub("", gloss).replace('"', "")
    parts = [p.strip() for p in rest.split(";")]
    return "; ".join(p for p in parts if p), examples


def clean_lemma(word: str) -> str:
    """Lemma as text: underscores to spaces, adjective syntactic markers like ``(p)`` dropped."""
    if word.endswith(")"):
        word = _ADJ_MARKER.sub("", word)
    return word.replace("_", " ")


def read_lexnames(path: Path) -> list[str]:
    """Lexicographer file names by number, from ``lexnames`` if present, else the WordNet 3.0 table."""
    file = path / "lexnames"
    if not file.exists():
        return list(WORDNET30_LEXNAMES)
    names: dict[int, str] = {}
    for line in file.read_text(encoding="utf-8").splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0].isdigit():
            names[int(fields[0])] = fields[1]
    return [names.get(i, f"unknown.{i}") for i in range(max(names, default=-1) + 1)]


def parse_data_line(line: str, lexnames: list[str]) -> Synset:
    """Parse one synset line of a ``data.<pos>`` file."""
    head, _, gloss = line.partition("|")
    tokens = head.split()
    offset, lex_filenum, ss_type = int(tokens[0]), int(tokens[1]), tokens[2]
    w_cnt = int(tokens[3], 16)
    words = tokens[4 : 4 + 2 * w_cnt : 2]
    lex_ids = [int(t, 16) for t in tokens[5 : 5 + 2 * w_cnt : 2]]
    i = 4 + 2 * w_cnt
    p_cnt = int(tokens[i])
    pointers = []
    for j in range(i + 1, i + 1 + 4 * p_cnt, 4):
        symbol, target_offset, target_pos, source_target = tokens[j : j + 4]
        target = f"{target_offset.zfill(8)}-{'a' if target_pos == 's' else target_pos}"
        if source_target == "0000":
            pointers.append(Pointer(symbol, target))
        else:
            pointers.append(Pointer(symbol, target, int(source_target[:2], 16), int(source_target[2:], 16)))
    definition, examples = split_gloss(gloss.strip())
    file_pos = "a" if ss_type == "s" else ss_type
    lexname = lexnames[lex_filenum] if lex_filenum < len(lexnames) else f"unknown.{lex_filenum}"
    return Synset(
        id=f"{offset:08d}-{file_pos}",
        offset=offset,
        pos=ss_type,
        lexname=lexname,
        lemmas=[clean_lemma(w) for w in words],
        definition=definition,
        examples=examples,
        pointers=pointers,
        lex_ids=lex_ids,
    )


def _read_lines(file: Path) -> Iterator[tuple[int, str]]:
    with file.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip() and not line.startswith("  "):  # license header lines start with two spaces
                yield number, line


def load_wordnet(path: str | Path = DEFAULT_PATH) -> WordNet:
    """Parse all four ``data.*`` files (and ``index.*`` for sense order, when present) under ``path``."""
    root = Path(path)
    missing = [f"data.{name}" for name in FILE_POS if not (root / f"data.{name}").is_file()]
    if missing:
        raise FileNotFoundError(
            f"WordNet database not found at {root} (missing {', '.join(missing)}): "
            "install the Debian package wordnet-base (apt-get install wordnet-base) or pass its directory"
        )
    lexnames = read_lexnames(root)
    synsets: dict[str, Synset] = {}
    for name in FILE_POS:
        file = root / f"data.{name}"
        for number, line in _read_lines(file):
            try:
                synset = parse_data_line(line, lexnames)
            except (ValueError, IndexError) as error:
                raise ValueError(f"{file}:{number}: malformed synset line ({error})") from error
            synsets[synset.id] = synset
    senses: dict[tuple[str, str], list[str]] = {}
    indexed = [name for name in FILE_POS if (root / f"index.{name}").is_file()]
    for name in indexed:
        _read_index(root / f"index.{name}", FILE_POS[name], synsets, senses)
    if len(indexed) < len(FILE_POS):
        _add_missing_senses(synsets, senses)
    return WordNet(synsets, senses, str(root))


def _read_index(
    file: Path, pos: str, synsets: dict[str, Synset], senses: dict[tuple[str, str], list[str]]
) -> None:
    """Read ``index.<pos>``: lemma pos synset_cnt p_cnt [ptr_symbol...] sense_cnt tagsense_cnt offsets."""
    for number, line in _read_lines(file):
        tokens = line.split()
        try:
            synset_cnt, p_cnt = int(tokens[2]), int(tokens[3])
            tagsense_cnt = int(tokens[5 + p_cnt])
            offsets = tokens[6 + p_cnt : 6 + p_cnt + synset_cnt]
        except (ValueError, IndexError) as error:
            raise ValueError(f"{file}:{number}: malformed index line ({error})") from error
        ids = [f"{int(o):08d}-{pos}" for o in offsets]
        ids = [i for i in ids if i in synsets]
        senses[(tokens[0].replace("_", " "), pos)] = ids
        for i in ids[:tagsense_cnt]:
            synsets[i].tagged = True


def _add_missing_senses(synsets: dict[str, Synset], senses: dict[tuple[str, str], list[str]]) -> None:
    """Index lemmas that no ``index.*`` line lists (or every lemma when index files are absent)."""
    listed = {(key, i) for key, ids in senses.items() for i in ids}
    for synset in synsets.values():
        for lemma in synset.lemmas:
            key = (lemma.lower(), synset.file_pos)
            if (key, synset.id) not in listed:
                senses.setdefault(key, []).append(synset.id)
                listed.add((key, synset.id))
