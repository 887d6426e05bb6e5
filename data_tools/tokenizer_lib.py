"""Shared tokenizer helpers: load a sentencepiece model with its card (PREFIX.json, see
docs/formats.md) and check that the two still belong together.

Used by data_tools/train_tokenizer.py (which writes the pair) and data_tools/shard.py (which
records the model's sha256 in its manifest, so a dataset names the exact tokenizer it needs).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

CARD_FORMAT = "pretrain-tokenizer"
CARD_VERSION = 1
# Fixed for every tokenizer this project trains; shard.py appends eos after each document.
SPECIAL_IDS = {"pad": 0, "unk": 1, "bos": 2, "eos": 3}
RETRAIN = "re-run data_tools/train_tokenizer.py"


class TokenizerError(ValueError):
    """A tokenizer problem, stated as one line: the file, what is wrong and the fix."""


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks so large files stay out of memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def card_path(model_path: str | Path) -> Path:
    """PREFIX.model -> PREFIX.json (the card lies next to the model)."""
    return Path(model_path).with_suffix(".json")


def read_card(model_path: str | Path) -> dict | None:
    """The card of a model, or None when the model has none (e.g. a model trained elsewhere)."""
    path = card_path(model_path)
    if not path.is_file():
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


def load_tokenizer(model_path: str | Path):
    """Load PREFIX.model and its card; returns (SentencePieceProcessor, card or None, sha256).

    With a card, the model's sha256 and special ids must match it: a card left over from an
    earlier model (or a model copied over another) would otherwise go unnoticed until the
    token ids of a dataset stopped meaning what its manifest says.
    """
    import sentencepiece as spm  # here, so that importing this module stays cheap

    model_path = Path(model_path)
    if not model_path.is_file():
        raise TokenizerError(f"tokenizer model {model_path} does not exist; pass the PREFIX.model "
                             f"written by data_tools/train_tokenizer.py")
    sha256 = file_sha256(model_path)
    card = read_card(model_path)
    processor = spm.SentencePieceProcessor()
    try:
        processor.Load(str(model_path))
    except (OSError, RuntimeError) as err:
        raise TokenizerError(f"{model_path}: not a sentencepiece model ({err}); {RETRAIN}") from None
    if card is not None:
        if card.get("sha256") != sha256:
            raise TokenizerError(f"{card_path(model_path)}: sha256 {card.get('sha256')} does not match "
                                 f"{model_path} ({sha256}); the card belongs to another model, {RETRAIN}")
        actual = {"pad": processor.pad_id(), "unk": processor.unk_id(),
                  "bos": processor.bos_id(), "eos": processor.eos_id()}
        if card.get("special_ids") != actual:
            raise TokenizerError(f"{model_path}: special ids {actual} differ from the card's "
                                 f"{card.get('special_ids')}; {RETRAIN}")
        if card.get("vocab_size") != processor.GetPieceSize():
            raise TokenizerError(f"{model_path}: {processor.GetPieceSize()} pieces but the card says "
                                 f"vocab_size={card.get('vocab_size')}; {RETRAIN}")
    return processor, card, sha256


# ---------------------------------------------------------------- Hugging Face tokenizer.json

from pretrain.hf_tokenizer import EOS_CANDIDATES  # noqa: E402  (one list for shard and export)


def is_hf_tokenizer(path: str | Path) -> bool:
    """A Hugging Face `tokenizer.json` (tokenizers library) rather than a sentencepiece model."""
    return str(path).endswith(".json")


class HFTokenizer:
    """A tokenizer.json behind the part of sentencepiece's API that shard.py uses: batch
    encode of UTF-8 chunks, vocabulary size, eos id. Encoding is single-threaded (like the
    sentencepiece actors) and deterministic."""

    def __init__(self, path: str | Path, data: bytes | None = None):
        import os

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
        self.eos = self._eos_id(path, vocab)

    @staticmethod
    def _eos_id(path: Path, vocab: dict) -> int:
        config = path.with_name("tokenizer_config.json")
        names = list(EOS_CANDIDATES)
        if config.is_file():
            token = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
            token = token.get("content") if isinstance(token, dict) else token
            names = [token] if token else names
        for name in names:
            if name in vocab:
                return vocab[name]
        return -1

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
