"""The tokenizer side of the data layer, shared by data_tools/ and pretrain/: opening a
sentencepiece model or a Hugging Face tokenizer.json (hash-checked), the card PREFIX.json
that train_tokenizer.py writes beside a model, and one-text-at-a-time encode/decode.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pretrain.errors import DataError
from pretrain.files import file_sha256

CARD_FORMAT = "pretrain-tokenizer"
CARD_VERSION = 1
# Fixed for every tokenizer this project trains; shard.py appends eos after each document.
SPECIAL_IDS = {"pad": 0, "unk": 1, "bos": 2, "eos": 3}
RETRAIN = "re-run data_tools/train_tokenizer.py"
# Names the end-of-text token goes by in tokenizer.json files, when no tokenizer_config.json
# beside the file says (shard.py appends it after every document; the HF export names it).
EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")


class TokenizerError(DataError):
    """A tokenizer problem, stated as one line: the file, what is wrong and the fix."""


def is_hf_tokenizer(path: str | Path) -> bool:
    """A Hugging Face `tokenizer.json` (tokenizers library) rather than a sentencepiece model."""
    return str(path).endswith(".json")


def card_path(model_path: str | Path) -> Path:
    """PREFIX.model -> PREFIX.json (the card lies next to the model)."""
    return Path(model_path).with_suffix(".json")


def read_card(model_path: str | Path) -> dict | None:
    """The card of a model, or None when the model has none (e.g. a model trained elsewhere)."""
    path = card_path(model_path)
    if is_hf_tokenizer(model_path) or not path.is_file():
        return None
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TokenizerError(f"{path}: not a valid JSON tokenizer card ({err}); {RETRAIN}") from None
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise TokenizerError(f"{path}: format is {card.get('format') if isinstance(card, dict) else None!r}, "
                             f"expected {CARD_FORMAT!r}; {RETRAIN}")
    if card.get("format_version") != CARD_VERSION:
        raise TokenizerError(f"{path}: format_version {card.get('format_version')!r} is not one this "
                             f"code reads ({CARD_VERSION}); {RETRAIN}")
    return card


def open_tokenizer(path: str | Path, sha256: str | None = None, data: bytes | None = None):
    """A sentencepiece processor (single-threaded) or an `HFTokenizer` for a tokenizer.json,
    read once from `data` or the file; with `sha256`, the bytes must hash to it."""
    import hashlib

    import sentencepiece as spm  # here, so that importing this module stays cheap

    path = Path(path)
    if data is None:
        if not path.is_file():
            raise TokenizerError(f"tokenizer {path}: no such file; pass the PREFIX.model written "
                                 f"by data_tools/train_tokenizer.py (or a Hugging Face tokenizer.json)")
        data = path.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise TokenizerError(f"tokenizer {path} (sha256 {hashlib.sha256(data).hexdigest()[:12]}) "
                             f"is not the one expected ({sha256[:12]})")
    if is_hf_tokenizer(path):
        return HFTokenizer(path, data)
    try:
        return spm.SentencePieceProcessor(model_proto=data, num_threads=1)
    except (RuntimeError, OSError, TypeError) as err:
        raise TokenizerError(f"{path}: not a sentencepiece model ({err}); pass the PREFIX.model "
                             f"written by data_tools/train_tokenizer.py") from None


def load_tokenizer(model_path: str | Path):
    """Load a tokenizer and its card; returns (processor, card or None, sha256).

    With a card, the model's sha256 and special ids must match it: a card left over from an
    earlier model (or a model copied over another) would otherwise go unnoticed until the
    token ids of a dataset stopped meaning what its manifest says.
    """
    model_path = Path(model_path)
    if not model_path.is_file():
        raise TokenizerError(f"tokenizer model {model_path} does not exist; pass the PREFIX.model "
                             f"written by data_tools/train_tokenizer.py")
    sha256 = file_sha256(model_path)
    card = read_card(model_path)
    processor = open_tokenizer(model_path)
    if card is not None:
        if card.get("sha256") != sha256:
            raise TokenizerError(f"{card_path(model_path)}: sha256 {card.get('sha256')} does not match "
                                 f"{model_path} ({sha256}); the card belongs to another model, {RETRAIN}")
        actual = {"pad": processor.pad_id(), "unk": processor.unk_id(),
                  "bos": processor.bos_id(), "eos": processor.eos_id()}
        if card.get("special_ids") != actual:
            raise TokenizerError(f"{model_path}: special ids {actual} differ from the card's "
                                 f"{card.get('special_ids')}; {RETRAIN}")
        if card.get("vocab_size") != processor.get_piece_size():
            raise TokenizerError(f"{model_path}: {processor.get_piece_size()} pieces but the card "
                                 f"says vocab_size={card.get('vocab_size')}; {RETRAIN}")
    return processor, card, sha256


class HFTokenizer:
    """A tokenizer.json behind the part of sentencepiece's API that the data tools use: batch
    encode of UTF-8 chunks, decode, vocabulary size, eos id. Encoding is single-threaded (like
    the sentencepiece actors) and deterministic."""

    def __init__(self, path: str | Path, data: bytes | None = None):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        os.environ.setdefault("RAYON_NUM_THREADS", "1")
        from tokenizers import Tokenizer

        path = Path(path)
        data = path.read_bytes() if data is None else data
        try:
            self.tokenizer = Tokenizer.from_str(data.decode("utf-8"))
        except Exception as err:  # tokenizers raises a bare Exception on a bad file
            raise TokenizerError(f"{path}: not a Hugging Face tokenizer.json ({err}); pass a "
                                 f"tokenizer.json saved by transformers/tokenizers") from None
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        # transformers' tokenizer_config.json beside the file ({} when there is none)
        self.config = config = _read_config(path.with_name("tokenizer_config.json"))
        eos = token_content(config.get("eos_token"))
        self.eos = next((vocab[name] for name in ([eos] if eos else EOS_CANDIDATES)
                         if name in vocab), -1)
        self.prefix_ids, self.suffix_ids = self._affixes()

    def _affixes(self) -> tuple[list[int], list[int]]:
        """The ids transformers' `encode(text)` puts before and after the text's own: shard.py
        frames every document with them (then the EOT), so a document's ids are what
        AutoTokenizer gives for it. The post-processor decides (Llama 3's template adds
        <|begin_of_text|>, Qwen's ByteLevel one adds nothing): transformers (5.x) ignores
        tokenizer_config.json's add_bos_token/add_eos_token when a tokenizer.json is there.
        A trailing EOS equal to the EOT is left out: shard.py appends the EOT itself."""
        probe = self.tokenizer.encode("a", add_special_tokens=True)
        text = [i for i, special in enumerate(probe.special_tokens_mask) if not special]
        if not text:
            return [], []
        prefix, suffix = probe.ids[:text[0]], probe.ids[text[-1] + 1:]
        if suffix and suffix[-1] == self.eos:
            suffix = suffix[:-1]
        return list(prefix), list(suffix)

    def get_piece_size(self) -> int:
        return self.vocab_size

    def eos_id(self) -> int:
        return self.eos

    def encode(self, texts, return_type=None, num_threads=None):
        import numpy as np

        texts = [t.decode("utf-8") if isinstance(t, bytes) else t for t in texts]
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        return [np.array(e.ids, dtype=np.int64) for e in encodings]

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def _read_config(path: Path) -> dict:
    """tokenizer_config.json beside a tokenizer.json, or {} when there is none."""
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TokenizerError(f"{path}: not valid JSON ({err}); save it again with "
                             f"tokenizer.save_pretrained, or remove it") from None
    if not isinstance(config, dict):
        raise TokenizerError(f"{path}: holds {type(config).__name__}, not a JSON object; save it "
                             f"again with tokenizer.save_pretrained, or remove it")
    return config


def token_content(value) -> str | None:
    """A special token as tokenizer_config.json states it: a string or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def document_affixes(processor) -> tuple[list[int], list[int]]:
    """(ids before, ids after) each document's own, EOT not included: a family tokenizer's
    BOS (HFTokenizer), none for this project's sentencepiece models."""
    if isinstance(processor, HFTokenizer):
        return processor.prefix_ids, processor.suffix_ids
    return [], []


class TextTokenizer:
    """One text at a time, for samples and inspection, over either kind of tokenizer."""

    def __init__(self, processor):
        self.processor = processor
        self.vocab_size = processor.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.processor.encode([text])[0]]

    def decode(self, ids) -> str:
        return self.processor.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])
