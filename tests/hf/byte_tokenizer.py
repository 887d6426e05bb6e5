"""A Hugging Face tokenizer.json that encodes exactly as the embedded corpus's byte-level
tokenizer (pretrain/data/embedded.py: id = UTF-8 byte, 256 = end of text), so the small
random HF models of the tests can carry a tokenizer that matches their training data
(`checkpoint.load_from=hf:DIR` checks DIR's tokenizer against the data's)."""

from __future__ import annotations

import json
from pathlib import Path

from pretrain.data.embedded import EOD_ID

EOD = "<eod>"


def _byte_chars() -> dict[int, str]:
    """The printable character the ByteLevel pre-tokenizer stands in for each byte: printable
    Latin-1 bytes as themselves, the others as 256, 257, ... in byte order."""
    kept = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    chars, extra = {}, 0
    for byte in range(256):
        if byte in kept:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return chars


def save_byte_tokenizer(directory: Path, swap: tuple[int, int] | None = None) -> Path:
    """DIR/tokenizer.json (+ tokenizer_config.json naming the end-of-text token). `swap`: two
    byte ids exchanged, a tokenizer that differs from the data's on those bytes only."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    ids = {char: byte for byte, char in _byte_chars().items()}
    if swap:
        a, b = (_byte_chars()[i] for i in swap)
        ids[a], ids[b] = ids[b], ids[a]
    tokenizer = Tokenizer(models.BPE(vocab={**ids, EOD: EOD_ID}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([EOD])
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOD}))
    return directory / "tokenizer.json"
