"""Library behind data_tools/curate.py: a recipe of stages (dedup, quality, language,
decontamination) run on Ray over raw text corpora, written as .jsonl.zst shards + manifest.

Modules: `recipe` (stage names, parameters, defaults, checks), `text` (words and n-gram
hashes shared by the stages), `quality` (Gopher and C4 rules), `filters` (per-document stages:
quality, language, decontamination), `minhash` (signatures, LSH bands, candidate edges,
union-find), `reader` (input units into documents), `documents` (phase 1: a unit through the
per-document stages), `dedup` (phase 2: one dedup stage on Ray shuffles), `summary` (each
document's fate, the manifest and report), `output` (shards and the replace protocol),
`pipeline` (the driver). Input discovery and reading are the data layer's
(pretrain/data/formats.py, data_tools/shard_lib/inputs.py), atomic writes pretrain/files.py's.
"""
