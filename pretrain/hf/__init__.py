"""Hugging Face interop: weight conversion (convert.py), `checkpoint.load_from=hf:DIR`
(importer.py), export of a checkpoint as a transformers model (export.py), and the tokenizer
bridge (tokenizer.py)."""
