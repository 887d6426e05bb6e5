"""Library behind data_tools/shard.py: reading and cleaning documents, tokenizing them on Ray,
packing samples and writing the shard format of docs/formats.md.

Modules, in pipeline order: `inputs` (plan read units, read them into pieces of documents),
`clean` (UTF-8 repair, binary detection, normalized hash, long-document chunking), `tokenize`
(the actor that encodes documents), `cache` (per-unit results in DIR/.work for resuming),
`pack` (samples and tar shards), `pipeline` (the driver), `replace` (swapping in a new dataset)
and `atomic` (the output directory lock). Input discovery and per-format reading, tokenizer
loading and the manifest are the data layer's (pretrain/data/formats.py), shared with the
trainer's readers; atomic writes and hashes are pretrain/files.py's.
"""
