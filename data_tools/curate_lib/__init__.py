"""Library behind data_tools/curate.py: a recipe of stages (dedup, quality, language,
decontamination) run on Ray over raw text corpora, written as .jsonl.zst shards + manifest.

Modules: `recipe` (stage names, parameters, defaults, checks), `text` (words and n-gram
hashes shared by the stages), `quality` (Gopher and C4 rules), `filters` (per-document stages:
quality, language, decontamination), `minhash` (signatures, LSH bands, candidate edges),
`reader` (input units into documents), `pipeline` (the driver), `output` (shards, manifest,
report, the replace protocol). Input discovery and reading are the data layer's
(pretrain/data/formats.py, data_tools/shard_lib/inputs.py), atomic writes pretrain/files.py's.
"""
