"""Library behind data_tools/shard.py and data_tools/inspect_shards.py: reading and cleaning
documents, tokenizing them on Ray, packing samples and writing the shard format of docs/formats.md.

Modules, in pipeline order: `inputs` (find files, plan read units, read documents), `clean`
(UTF-8 repair, binary detection, normalized hash, long-document chunking), `tokenize` (the
actor that encodes documents), `cache` (per-unit results in DIR/.work for resuming), `pack`
(samples and tar shards), `manifest` (the dataset's index), `pipeline` (the driver), and
`atomic` (temp-file-then-rename writes and the output directory lock).
"""
