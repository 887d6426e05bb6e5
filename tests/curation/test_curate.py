"""data_tools/curate.py on a real local Ray (2 CPUs) with real files: every input format through a
recipe of every stage, the manifest's and report's counts, near-dedup recall and precision on a
generated corpus of 2,100 documents, byte-identical output for 1 and 2 workers, the replace
protocol, shard.py reading the output, and bad input ending in one line and exit status 2.

Ray starts once for the module (in-process builds share it); the CLI runs once as a subprocess
that joins it. Expected outcomes come from how the corpus was generated, not from the library.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

# one local Ray runtime per module, and the JSONL writer, as the shard tests have them
from tests.data_tools.test_shard import ray_local, write_jsonl  # noqa: F401

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CURATE = REPO / "data_tools" / "curate.py"

SUBJECTS = ["The farmer", "A young teacher", "My neighbour", "The old captain", "Her brother",
            "The small child", "A tired doctor", "The quiet student"]
VERBS = ["carried", "painted", "found", "repaired", "described", "opened", "cleaned", "watched"]
OBJECTS = ["the wooden boat", "a broken window", "the garden gate", "an old letter",
           "the kitchen table", "a heavy box", "the morning train", "a red kite"]
TAILS = ["before the storm arrived", "and then went home", "with great care",
         "near the river bank", "after a long day", "while the sun was setting",
         "in the busy market", "because it was needed"]
GERMAN = ("Der alte Bauer ging am Morgen mit seinem Hund über die Felder und sah, dass der Regen "
          "die Wege aufgeweicht hatte. ")
EVAL_PASSAGE = ("Which famous scientist proposed the theory of general relativity in the early "
                "twentieth century and changed physics forever")


def english(rng: random.Random, sentences: int = 8) -> str:
    lines = ["The story begins with the farmer and the dog."]
    for _ in range(sentences):
        lines.append(f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} "
                     f"{rng.choice(TAILS)}.")
    return "\n".join(lines)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Every input format and every stage's reason. Returns (input dir, recipe path, expected):
    expected = [(text as written out or None, id or None, stage, reason)] in input order."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    rng = random.Random(11)
    root = tmp_path_factory.mktemp("mixed")
    inputs = root / "in"
    inputs.mkdir()
    docs: dict[str, list[tuple]] = {}  # file -> [(raw text, id, stage, reason, kept text)]

    good = [english(rng) for _ in range(12)]
    menu = good[1] + "\nHome About Contact Login"  # C4 cuts the menu line, keeps the page
    docs["a.jsonl"] = [
        (good[0], 1, "kept", "", good[0]),
        (menu, 2, "kept", "", good[1]),
        ("Too short to keep.", 3, "gopher_quality", "too_few_words", None),
        ("   \n ", 4, "read", "empty", None),
        (GERMAN * 6, 5, "language", "language", None),
        (good[2] + "\nint main() { return 0; }", 6, "c4_quality", "curly_bracket", None),
    ]
    docs["b.jsonl.gz"] = [
        ("  " + good[0].replace("\n", "\n\n  ") + " ", "g1", "exact_dedup", "duplicate", None),
        (good[3] + "\n" + EVAL_PASSAGE.upper() + " again.", "g2", "decontaminate",
         "contaminated", None),
        (good[4], "g3", "kept", "", good[4]),
    ]
    docs["c.jsonl.zst"] = [(good[5], None, "kept", "", good[5]),
                           (good[4], None, "exact_dedup", "duplicate", None)]
    docs["d.parquet"] = [(good[6], 70, "kept", "", good[6]), (good[7], None, "kept", "", good[7])]
    docs["e.txt"] = [(good[8], None, "kept", "", good[8])]

    write_jsonl(inputs / "a.jsonl", [{"text": d[0], "id": d[1]} for d in docs["a.jsonl"]])
    write_jsonl(inputs / "b.jsonl.gz", [{"id": d[1], "text": d[0]} for d in docs["b.jsonl.gz"]],
                opener=gzip.open)
    with open(inputs / "c.jsonl.zst", "wb") as raw, \
            zstandard.ZstdCompressor().stream_writer(raw) as f:
        f.write("".join(json.dumps({"text": d[0]}) + "\n" for d in docs["c.jsonl.zst"]).encode())
    pq.write_table(pa.table({"id": [d[1] for d in docs["d.parquet"]],
                             "text": [d[0] for d in docs["d.parquet"]]}), inputs / "d.parquet")
    (inputs / "e.txt").write_text(docs["e.txt"][0][0], encoding="utf-8")

    (root / "eval.jsonl").write_text(json.dumps({"text": EVAL_PASSAGE + "? Einstein."}) + "\n")
    recipe = root / "recipe.yaml"
    recipe.write_text("stages:\n"
                      "  - exact_dedup: {}\n"
                      "  - language: {languages: [en], min_score: 0.5}\n"
                      "  - gopher_quality: {}\n"
                      "  - c4_quality: {}\n"
                      "  - decontaminate: {files: [eval.jsonl]}\n")
    expected = [(d[4], d[1], d[2], d[3], d[0]) for name in sorted(docs) for d in docs[name]]
    return inputs, recipe, expected


def build(inputs, output: Path, recipe: Path, **overrides):
    from data_tools.curate_lib.pipeline import Options, build as run

    settings = dict(log=io.StringIO())
    settings.update(overrides)
    return run(Options(inputs=[str(p) for p in inputs], output=str(output), recipe=str(recipe),
                       **settings))


def read_output(directory: Path) -> list[dict]:
    import zstandard

    manifest = json.loads((directory / "manifest.json").read_text())
    records = []
    for shard in manifest["shards"]:
        with open(directory / shard["name"], "rb") as f:
            data = zstandard.ZstdDecompressor().stream_reader(f).read()
        records.extend(json.loads(line) for line in data.decode().splitlines())
    return records


def tree(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()
            and not p.name.startswith(".")}


# ---------------------------------------------------------------- every format, every stage


def test_recipe_over_every_format(ray_local, mixed, tmp_path):
    inputs, recipe, expected = mixed
    result = build([inputs], tmp_path / "out", recipe, num_workers=2)
    records = read_output(tmp_path / "out")
    want = [{"text": text, **({"id": id_} if id_ is not None else {})}
            for text, id_, stage, _, _ in expected if stage == "kept"]
    assert records == want

    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["format"] == "pretrain-curated"
    assert manifest["documents"] == {"read": len(expected), "kept": len(want),
                                     "removed": len(expected) - len(want)}
    by_stage = {s["name"]: s for s in manifest["stages"]}
    for _, _, stage, reason, raw in expected:
        if stage != "kept":
            entry = by_stage[stage]["removed"][reason]
            assert entry["documents"] >= 1
    removed = {(name, reason): (entry["documents"], entry["bytes"])
               for name, s in by_stage.items() for reason, entry in s["removed"].items()}
    want_removed = {}
    for _, _, stage, reason, raw in expected:
        if stage != "kept":
            docs, size = want_removed.get((stage, reason), (0, 0))
            want_removed[(stage, reason)] = (docs + 1, size + len(raw.encode()))
    assert removed == want_removed
    assert by_stage["c4_quality"]["trimmed_bytes"] == {
        "line_no_terminal_punctuation": len("Home About Contact Login") + 1}
    assert manifest["recipe"][2] == {"gopher_quality": manifest["stages"][3]["params"]}
    assert manifest["stages"][3]["params"]["min_words"] == 50  # defaults recorded

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    example, = report["stages"][1]["removed"]["duplicate"]["examples"][:1]
    assert example["id"] == "g1" and example["path"].endswith("b.jsonl.gz")
    assert example["kept"]["id"] == 1 and example["kept"]["path"].endswith("a.jsonl")
    contaminated = report["stages"][5]["removed"]["contaminated"]
    assert contaminated["documents"] == 1 and "EINSTEIN" not in contaminated["examples"][0]["text"]
    assert result.removed  # positions -> (stage, reason, kept)


# ---------------------------------------------------------------- near-dedup on 2,100 documents


def word_ngrams(text: str, n: int = 5) -> set:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: str, b: str) -> float:
    x, y = word_ngrams(a), word_ngrams(b)
    return len(x & y) / len(x | y)


@pytest.fixture(scope="module")
def near_corpus(tmp_path_factory):
    """Families of near-copies (1-8 words of ~300 replaced: Jaccard ~0.75-0.98), hard negatives
    (20-35 replaced: ~0.4-0.65), unrelated singletons; shuffled over three JSONL files.
    Returns (input dir, recipe, texts in input order, family of each text)."""
    rng = random.Random(2026)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 9)))
             for _ in range(20000)]

    def mutate(words: list[str], k: int) -> list[str]:
        out = list(words)
        for i in rng.sample(range(len(out)), k):
            out[i] = rng.choice(vocab)
        return out

    docs = []  # (text, family)
    for family in range(350):
        base = [rng.choice(vocab) for _ in range(rng.randint(250, 350))]
        docs.append((" ".join(base), family))
        for _ in range(rng.randint(1, 3)):
            docs.append((" ".join(mutate(base, rng.randint(0, 8))), family))
        if family % 2 == 0:
            docs.append((" ".join(mutate(base, rng.randint(20, 35))), family))
    while len(docs) < 2100:
        docs.append((" ".join(rng.choice(vocab) for _ in range(rng.randint(100, 350))), -1 - len(docs)))
    rng.shuffle(docs)
    root = tmp_path_factory.mktemp("near")
    (root / "in").mkdir()
    for part, start in enumerate(range(0, len(docs), 700)):
        write_jsonl(root / "in" / f"part{part}.jsonl",
                    [{"text": t, "id": start + i} for i, (t, _) in enumerate(docs[start:start + 700])])
    recipe = root / "recipe.yaml"
    recipe.write_text("stages:\n  - near_dedup: {threshold: 0.8}\n")
    return root / "in", recipe, [t for t, _ in docs], [f for _, f in docs]


def test_near_dedup_recall_precision_and_worker_count_identity(ray_local, near_corpus, tmp_path):
    inputs, recipe, texts, families = near_corpus
    result = build([inputs], tmp_path / "two", recipe, num_workers=2, unit_bytes=300_000)
    kept_ids = {r["id"] for r in read_output(tmp_path / "two")}
    assert len(texts) >= 2000

    members: dict[int, list[int]] = {}
    for i, family in enumerate(families):
        members.setdefault(family, []).append(i)
    similar_pairs = caught = 0
    for group in members.values():
        for x in range(len(group)):
            for y in range(x + 1, len(group)):
                a, b = group[x], group[y]
                if jaccard(texts[a], texts[b]) >= 0.85:
                    similar_pairs += 1
                    caught += not (a in kept_ids and b in kept_ids)
    assert similar_pairs > 300
    assert caught / similar_pairs >= 0.95, (caught, similar_pairs)

    near = {i: kept for i, (stage, reason, kept) in result.removed.items() if reason == "near_duplicate"}
    assert len(near) > 300
    assert all(kept in kept_ids and kept < i for i, kept in near.items())  # lowest position kept
    close = sum(jaccard(texts[i], texts[kept]) >= 0.75 for i, kept in near.items())
    assert close / len(near) >= 0.98, (close, len(near))
    assert set(range(len(texts))) - set(near) == kept_ids

    build([inputs], tmp_path / "one", recipe, num_workers=1)
    assert tree(tmp_path / "one") == tree(tmp_path / "two")


# ---------------------------------------------------------------- replace protocol, shard.py, CLI


def test_existing_output_is_never_replaced_without_overwrite(ray_local, mixed, tmp_path):
    from data_tools.curate_lib.errors import CurateError

    inputs, recipe, _ = mixed
    out = tmp_path / "out"
    build([inputs], out, recipe)
    before = tree(out)
    with pytest.raises(CurateError, match="holds a finished curated dataset; pass --overwrite"):
        build([inputs], out, recipe)
    # A run that fails (a bad record) with --overwrite leaves the old dataset whole.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jsonl").write_text('{"text": "fine"}\n{"text": 5}\n')
    with pytest.raises(CurateError, match=r"x.jsonl:2: a int field 'text'.*--text-key"):
        build([bad], out, recipe, overwrite=True)
    assert tree(out) == before and not (out / ".next").exists()
    # With --overwrite a smaller dataset replaces it: stale shards go.
    (out / "part-000007.jsonl.zst").write_bytes(b"stale")
    build([inputs / "e.txt"], out, recipe, overwrite=True)
    assert [r["text"][:9] for r in read_output(out)] == ["The story"]
    assert sorted(tree(out)) == ["manifest.json", "part-000000.jsonl.zst", "report.json"]
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.jsonl").write_text("{}\n")
    with pytest.raises(CurateError, match="holds files curate.py did not write \\(notes.jsonl\\)"):
        build([inputs], tmp_path / "foreign", recipe, overwrite=True)


def test_shard_reads_the_curated_output(ray_local, mixed, tmp_path):
    import sentencepiece as spm

    from data_tools.shard_lib.pipeline import Options, build as shard

    inputs, recipe, expected = mixed
    build([inputs], tmp_path / "cur", recipe, shard_bytes=2000)  # several shards
    manifest = json.loads((tmp_path / "cur" / "manifest.json").read_text())
    assert len(manifest["shards"]) > 1
    lines = [line for text, _, stage, *_ in expected if stage == "kept"
             for line in text.splitlines()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines * 20), model_prefix=str(tmp_path / "tok"), vocab_size=400,
        model_type="bpe", eos_id=3, pad_id=0, unk_id=1, bos_id=2, byte_fallback=True,
        num_threads=1, minloglevel=2)
    shards = shard(Options(inputs=[str(tmp_path / "cur")], output=str(tmp_path / "shards"),
                           tokenizer=str(tmp_path / "tok.model"), seq_len=16, val_fraction=0.0,
                           progress=False, log=io.StringIO()))
    assert shards["documents"]["read"] == manifest["documents"]["kept"]
    assert shards["documents"]["kept"] == manifest["documents"]["kept"]


def test_cli_bad_record_is_one_line_exit_2(ray_local, mixed, tmp_path, capsys):
    from data_tools.curate import main

    _, recipe, _ = mixed
    (tmp_path / "x.jsonl").write_text('{"text": "fine"}\n{not json\n')
    status = main(["--input", str(tmp_path / "x.jsonl"), "--output", str(tmp_path / "out"),
                   "--recipe", str(recipe)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {tmp_path / 'x.jsonl'}:2: not valid JSON"), err
    assert not (tmp_path / "out" / "manifest.json").exists()
    status = main(["--input", str(tmp_path / "none.jsonl"), "--output", str(tmp_path / "out"),
                   "--recipe", str(recipe)])
    assert status == 2 and "no such file or directory" in capsys.readouterr().err


def test_cli_joins_a_ray_cluster_and_writes_the_dataset(ray_local, mixed, tmp_path):
    import ray

    inputs, recipe, expected = mixed
    address = ray.get_runtime_context().gcs_address
    proc = subprocess.run([sys.executable, str(CURATE), "--input", str(inputs), "--output",
                           str(tmp_path / "out"), "--recipe", str(recipe), "--ray-address", address],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    kept = sum(stage == "kept" for _, _, stage, _, _ in expected)
    assert f"{kept:,} kept" in proc.stdout
    assert len(read_output(tmp_path / "out")) == kept
