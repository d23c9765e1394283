"""WordNet reader and quality-benchmark tasks: a fake database in the real file format, JSONL, real tasks."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from benchmarks.quality.tasks import (
    TASK_NAMES,
    Example,
    Task,
    build_tasks,
    chance_accuracy,
    load_task_jsonl,
    save_task_jsonl,
    split_sizes,
    task_summary,
)
from benchmarks.quality.wordnet import (
    WORDNET30_LEXNAMES,
    clean_lemma,
    load_wordnet,
    split_gloss,
)

REAL_WORDNET = Path("/usr/share/wordnet")
REAL_CAPS = {"max_train": 300, "max_eval": 150}  # smaller than the defaults to keep the tests fast

# key: (file, lex_filenum, ss_type, [(word, lex_id)], [(symbol, target key, source word, target word)],
#       verb frames or "", gloss)
FAKE: dict[str, tuple] = {
    "entity": ("noun", 3, "n", [("entity", 0)], [("~", "organism", 0, 0)], "", "that which exists"),
    "organism": ("noun", 3, "n", [("organism", 0), ("being", 0)],
                 [("@", "entity", 0, 0), ("~", "dog", 0, 0), ("~", "cat", 0, 0)], "",
                 'a living thing; "an organism needs food"'),
    "dog": ("noun", 5, "n", [("dog", 0), ("domestic_dog", 0), ("Canis_familiaris", 0)],
            [("@", "organism", 0, 0), ("#m", "pack", 0, 0), ("%p", "tail", 0, 0), ("+", "bark", 1, 1)], "",
            'a member of the genus Canis; "the dog barked all night"; "a good dog"'),
    "cat": ("noun", 5, "n", [("cat", 0)], [("@", "organism", 0, 0)], "", "feline mammal"),
    "pack": ("noun", 14, "n", [("pack", 0)], [("%m", "dog", 0, 0)], "", "a group of hunting animals"),
    "tail": ("noun", 8, "n", [("tail", 0)], [("#p", "dog", 0, 0)], "", "the posterior part of an animal"),
    "temperature": ("noun", 7, "n", [("temperature", 0)], [("=", "hot", 0, 0), ("=", "cold", 0, 0)], "",
                    "the degree of hotness or coldness of a body"),
    "medicine": ("noun", 9, "n", [("medicine", 0), ("medical_specialty", 0)], [("-c", "fever", 0, 0)], "",
                 "the branches of medical science that deal with nonsurgical techniques"),
    "fever": ("noun", 26, "n", [("fever", 0), ("febrility", 0)],
              [("@", "entity", 0, 0), (";c", "medicine", 0, 0)], "",
              'a rise in the temperature of the body; "he had a fever"'),
    "bark": ("verb", 32, "v", [("bark", 0)], [("+", "dog", 1, 1)], "01 + 02 00",
             'make barking sounds; "The dogs barked at the stranger"'),
    "sleep": ("verb", 29, "v", [("sleep", 0), ("kip", 0)], [], "02 + 02 00 + 08 01", "be asleep"),
    "snore": ("verb", 29, "v", [("snore", 0), ("saw_wood", 0)], [("*", "sleep", 0, 0)], "01 + 02 00",
              "breathe noisily during one's sleep; \"she snores\""),
    "hot": ("adj", 0, "a", [("hot", 0)],
            [("!", "cold", 1, 1), ("&", "scorching", 0, 0), ("=", "temperature", 0, 0)], "",
            'used of physical heat; having a high temperature; "hot stove"; "hot water"'),
    "scorching": ("adj", 0, "s", [("scorching", 0), ("ablaze(p)", 0)], [("&", "hot", 0, 0)], "",
                  "hot enough to burn"),
    "cold": ("adj", 0, "a", [("cold", 0)], [("!", "hot", 1, 1), ("=", "temperature", 0, 0)], "",
             'having a low temperature; "a cold climate"'),
    "hotly": ("adv", 2, "r", [("hotly", 0)], [("\\", "hot", 1, 1)], "", "in a hot manner"),
}  # fmt: skip
TAGGED = {"dog", "hot", "sleep"}  # senses listed as tagged (frequent) in the fake index files
HEADER = "  1 This software and database is being provided to you, the LICENSEE, by  \n  2 Princeton  \n"
POS_OF_FILE = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}


def _data_line(key: str, offsets: dict[str, int]) -> str:
    file, lexfile, ss_type, words, pointers, frames, gloss = FAKE[key]
    fields = [f"{offsets.get(key, 0):08d}", f"{lexfile:02d}", ss_type, f"{len(words):02x}"]
    fields += [f"{word} {lex_id:x}" for word, lex_id in words]
    fields.append(f"{len(pointers):03d}")
    for symbol, target, src, tgt in pointers:
        pos = POS_OF_FILE[FAKE[target][0]]
        fields.append(f"{symbol} {offsets.get(target, 0):08d} {pos} {src:02x}{tgt:02x}")
    if frames:
        fields.append(frames)
    return " ".join(fields) + f" | {gloss}  \n"


def write_fake_wordnet(root: Path, lexnames: bool = True) -> Path:
    """Write data.* and index.* files (real byte offsets) and optionally a lexnames file."""
    root.mkdir(parents=True, exist_ok=True)
    offsets: dict[str, int] = {}
    for file in POS_OF_FILE:  # offsets are fixed-width, so one pass with zeros gives the final positions
        position = len(HEADER.encode())
        for key in (k for k, v in FAKE.items() if v[0] == file):
            offsets[key] = position
            position += len(_data_line(key, {}).encode())
    for file, pos in POS_OF_FILE.items():
        keys = [k for k, v in FAKE.items() if v[0] == file]
        (root / f"data.{file}").write_text(HEADER + "".join(_data_line(k, offsets) for k in keys))
        index: dict[str, list[str]] = {}
        for key in keys:
            for word, _ in FAKE[key][3]:
                index.setdefault(clean_lemma(word).lower().replace(" ", "_"), []).append(key)
        lines = []
        for lemma, senses in sorted(index.items()):
            symbols = sorted({p[0] for k in senses for p in FAKE[k][4]})
            tagged = sum(k in TAGGED for k in senses)
            counts = [str(len(senses)), str(len(symbols)), *symbols, str(len(senses)), str(tagged)]
            fields = [lemma, pos, *counts]
            lines.append(" ".join(fields + [f"{offsets[k]:08d}" for k in senses]) + "  \n")
        (root / f"index.{file}").write_text(HEADER + "".join(lines))
    if lexnames:
        rows = [f"{i:02d}\t{name}\t{1 + ['noun', 'verb', 'adj', 'adv'].index(name.split('.')[0])}\n"
                for i, name in enumerate(WORDNET30_LEXNAMES)]  # fmt: skip
        (root / "lexnames").write_text("".join(rows))
    return root


def _id(wn, key: str):
    """The synset of a fake key, found through its first lemma."""
    file, *_ = FAKE[key]
    first = clean_lemma(FAKE[key][3][0][0])
    return next(s for s in wn.senses(first, POS_OF_FILE[file]) if s.name == first)


@pytest.fixture(scope="module")
def fake_wn(tmp_path_factory):
    return load_wordnet(write_fake_wordnet(tmp_path_factory.mktemp("wordnet")))


# ---------------------------------------------------------------------------------------------- parser


def test_parser_reads_all_synsets_with_lemmas_and_lexnames(fake_wn):
    assert len(fake_wn) == len(FAKE)
    dog = _id(fake_wn, "dog")
    assert dog.lemmas == ["dog", "domestic dog", "Canis familiaris"]
    assert dog.pos == "n" and dog.lexname == "noun.animal" and dog.id.endswith("-n")
    assert _id(fake_wn, "pack").lexname == "noun.group"
    assert _id(fake_wn, "bark").lexname == "verb.communication"
    scorching = _id(fake_wn, "scorching")
    assert scorching.pos == "s" and scorching.file_pos == "a" and scorching.lemmas == ["scorching", "ablaze"]
    assert scorching.lexname == "adj.all" and _id(fake_wn, "hotly").lexname == "adv.all"


def test_parser_splits_definition_and_examples(fake_wn):
    dog = _id(fake_wn, "dog")
    assert dog.definition == "a member of the genus Canis"
    assert dog.examples == ["the dog barked all night", "a good dog"]
    hot = _id(fake_wn, "hot")
    assert hot.definition == "used of physical heat; having a high temperature"
    assert hot.examples == ["hot stove", "hot water"]
    cat = _id(fake_wn, "cat")
    assert cat.definition == "feline mammal" and cat.examples == []
    snore = _id(fake_wn, "snore")  # verb frames between pointers and gloss are skipped
    assert snore.definition == "breathe noisily during one's sleep" and snore.examples == ["she snores"]


def test_split_gloss_edge_cases():
    assert split_gloss('a b; "x y"; "z"') == ("a b", ["x y", "z"])
    assert split_gloss("only a definition; with two parts") == ("only a definition; with two parts", [])
    assert split_gloss('"just an example"') == ("", ["just an example"])
    assert split_gloss('unbalanced "quote') == ("unbalanced quote", [])


def test_parser_pointers(fake_wn):
    wn = fake_wn
    dog, organism, entity = _id(wn, "dog"), _id(wn, "organism"), _id(wn, "entity")
    assert [s.id for s in wn.related(dog, "@")] == [organism.id]
    assert [s.name for s in wn.closure([dog], "@")] == ["organism", "entity"]
    assert [s.name for s in wn.related(dog, "#m")] == ["pack"]
    assert [s.name for s in wn.related(dog, "%p")] == ["tail"]
    assert [s.name for s in wn.related(_id(wn, "tail"), "#p")] == ["dog"]
    assert [s.name for s in wn.related(_id(wn, "fever"), ";c")] == ["medicine"]
    assert [s.name for s in wn.related(_id(wn, "medicine"), "-c")] == ["fever"]
    assert [s.name for s in wn.related(_id(wn, "snore"), "*")] == ["sleep"]
    assert [s.name for s in wn.related(_id(wn, "hot"), "&")] == ["scorching"]
    assert [s.name for s in wn.related(_id(wn, "hot"), "=")] == ["temperature"]
    antonym = next(p for p in _id(wn, "hot").pointers if p.symbol == "!")
    assert antonym.lexical and (antonym.source_word, antonym.target_word) == (1, 1)
    assert not next(p for p in dog.pointers if p.symbol == "@").lexical
    assert [(w, t.name, a) for w, t, a in wn.lexical(_id(wn, "hot"), "!")] == [("hot", "cold", "cold")]
    assert [(w, t.name, a) for w, t, a in wn.lexical(dog, "+")] == [("dog", "bark", "bark")]
    assert [(w, t.name, a) for w, t, a in wn.lexical(_id(wn, "hotly"), "\\")] == [("hotly", "hot", "hot")]
    assert entity.targets("~") == [organism.id]


def test_index_senses_and_tagged(fake_wn):
    wn = fake_wn
    assert [s.name for s in wn.senses("Domestic_Dog")] == ["dog"]
    assert [s.name for s in wn.senses("ablaze", "a")] == ["scorching"]
    assert wn.senses("dog", "v") == [] and wn.senses("nonexistent") == []
    assert _id(wn, "dog").tagged and _id(wn, "hot").tagged and not _id(wn, "cat").tagged
    assert ("saw wood", "v") in {(lemma, pos) for lemma, pos, _ in wn.index()}


def test_lexnames_file_is_read_and_defaults_without_it(tmp_path):
    root = write_fake_wordnet(tmp_path / "no_lexnames", lexnames=False)
    assert _id(load_wordnet(root), "dog").lexname == "noun.animal"  # built-in WordNet 3.0 table
    (root / "lexnames").write_text("".join(f"{i:02d}\tx.file{i}\t1\n" for i in range(45)))
    assert _id(load_wordnet(root), "dog").lexname == "x.file5"


def test_senses_without_index_files(tmp_path):
    root = write_fake_wordnet(tmp_path / "no_index")
    for file in root.glob("index.*"):
        file.unlink()
    wn = load_wordnet(root)
    assert [s.name for s in wn.senses("Canis familiaris")] == ["dog"]
    assert [s.name for s in wn.senses("kip", "v")] == ["sleep"]
    assert not any(s.tagged for s in wn.all())


def test_missing_database_has_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="wordnet-base"):
        load_wordnet(tmp_path / "nowhere")


def test_malformed_data_line_names_file_and_line(tmp_path):
    root = write_fake_wordnet(tmp_path / "broken")
    with (root / "data.verb").open("a") as handle:
        handle.write("00099999 29 v zz broken | gloss\n")
    with pytest.raises(ValueError, match=r"data\.verb:6: malformed"):
        load_wordnet(root)


def test_build_tasks_on_a_tiny_wordnet_does_not_fail(fake_wn):
    tasks = build_tasks(fake_wn, num_candidates=2, min_eval=1)
    assert list(tasks) == list(TASK_NAMES)
    for task in tasks.values():
        for split in ("train", "validation", "test"):
            for e in task.split(split):
                assert len(e.candidates) == 2 and 0 <= e.label < 2
    with pytest.raises(ValueError, match="unknown task"):
        build_tasks(fake_wn, names=["no_such_task"])


# ----------------------------------------------------------------------------------------------- JSONL


def _tiny_task() -> Task:
    train = [Example("q1", ["a", "b", "c"], 0), Example("q2 é", ["d", "e", "f"], 2)]
    validation, test = [Example("q3", ["g", "h", "i"], 1)], [Example("q4", ["j", "k", "l"], 2)]
    return Task("tiny", False, train, validation, test)


def test_jsonl_round_trip(tmp_path):
    task = _tiny_task()
    path = save_task_jsonl(task, tmp_path / "sub" / "tiny.jsonl")
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny.jsonl"]  # no temp files left behind
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert set(rows[0]) == {"split", "query", "candidates", "label"}
    assert [r["split"] for r in rows] == ["train", "train", "validation", "test"]
    loaded = load_task_jsonl(path, held_out=True, description="mine")
    assert (loaded.train, loaded.validation, loaded.test) == (task.train, task.validation, task.test)
    assert loaded.name == "tiny" and loaded.held_out and loaded.description == "mine"
    assert chance_accuracy(loaded) == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ('["a"]', "expected a JSON object"),
        ('{"split": "train", "query": "q", "candidates": ["a", "b"]}', "missing field"),
        ('{"split": "dev", "query": "q", "candidates": ["a", "b"], "label": 0}', "split must be one of"),
        ('{"split": "test", "query": "", "candidates": ["a", "b"], "label": 0}', "query must be"),
        ('{"split": "test", "query": "q", "candidates": ["a"], "label": 0}', "at least 2"),
        ('{"split": "test", "query": "q", "candidates": ["a", 3], "label": 0}', "every candidate"),
        ('{"split": "test", "query": "q", "candidates": ["a", "b"], "label": 2}', "label must be"),
        ('{"split": "test", "query": "q", "candidates": ["a", "b"], "label": true}', "label must be"),
        ('{"split": "test", "query": "q", "candidates": ["a", "b", "c", "d"], "label": 0}', "same number"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path, line, message):
    good = json.dumps({"split": "train", "query": "q", "candidates": ["a", "b", "c"], "label": 1})
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n\n{line}\n")
    with pytest.raises(ValueError, match=rf"bad\.jsonl:3: .*{message}"):
        load_task_jsonl(path)


def test_jsonl_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no examples"):
        load_task_jsonl(tmp_path / "empty.jsonl")
    with pytest.raises(FileNotFoundError):
        load_task_jsonl(tmp_path / "missing.jsonl")


def test_split_sizes():
    assert split_sizes(100_000, 1000, 250) == (1000, 250, 250)
    assert split_sizes(1000, 1000, 250) == (700, 150, 150)
    train, val, test = split_sizes(434, 1000, 250)
    assert test == 150 and val < test and train + val + test == 434
    assert sum(split_sizes(10, 1000, 250)) == 10


# ------------------------------------------------------------------------------------- real WordNet


@pytest.fixture(scope="module")
def real():
    if not (REAL_WORDNET / "data.noun").exists():
        pytest.skip("Debian package wordnet-base is not installed")
    wn = load_wordnet(REAL_WORDNET)
    return wn, build_tasks(wn, seed=0, **REAL_CAPS)


def test_real_task_counts_and_summary(real):
    _, tasks = real
    held_in = [t for t in tasks.values() if not t.held_out]
    held_out = [t for t in tasks.values() if t.held_out]
    assert len(held_in) >= 12 and len(held_out) >= 4
    rows = task_summary(tasks)
    assert [r["name"] for r in rows] == list(tasks)
    for row in rows:
        assert row["test"] >= 150 and row["validation"] >= 50 and row["train"] >= 150, row
        assert row["num_candidates"] == 4 and row["chance"] == pytest.approx(0.25) and row["description"]


def test_real_tasks_are_well_formed_and_balanced(real):
    _, tasks = real
    for task in tasks.values():
        for split in ("train", "validation", "test"):
            examples = task.split(split)
            for e in examples:
                assert len(e.candidates) == 4, (task.name, e)
                normalised = [" ".join(c.lower().split()) for c in e.candidates]
                assert len(set(normalised)) == 4, (task.name, e)  # correct answer not duplicated
                assert all(c.strip() for c in e.candidates) and e.query.strip()
            positions = Counter(e.label for e in examples)
            for position in range(4):
                assert abs(positions[position] - len(examples) / 4) <= 1, (task.name, split, positions)


def test_real_tasks_have_no_query_leakage(real):
    _, tasks = real
    for task in tasks.values():
        train = {e.query for e in task.train}
        assert not train & {e.query for e in task.test}, task.name
        assert not train & {e.query for e in task.validation}, task.name
        assert len({e.query for e in task.test}) == len(task.test), task.name


def test_real_tasks_are_deterministic(real):
    wn, tasks = real
    names = ["noun_hypernym", "adj_antonym", "part_whole"]
    again = build_tasks(wn, seed=0, names=names, **REAL_CAPS)
    assert all(again[n] == tasks[n] for n in names)
    other = build_tasks(wn, seed=1, names=names[:1], **REAL_CAPS)
    assert other[names[0]].test != tasks[names[0]].test
