"""Our sentencepiece tokenizer as a Hugging Face fast tokenizer (tokenizer.json built with the
`tokenizers` library), giving the same ids as sentencepiece on any text.

Written here rather than through transformers' slow->fast converter: that one assumes
Llama's dummy-prefix and whitespace settings, while data_tools/train_tokenizer.py trains with
identity normalization, no dummy prefix, kept whitespace runs and byte fallback. The
settings are read from the model itself; ones this converter cannot reproduce are refused.
"""

from __future__ import annotations

import json
from pathlib import Path

from pretrain.data.tokenizers import HFTokenizer, token_content
from pretrain.errors import CheckpointError

SPACE = "\u2581"  # sentencepiece's visible space
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def _proto(model_path: Path):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_path.read_bytes())
    return proto


def _bpe_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of a piece into two pieces, ranked by the merged piece's id (sentencepiece
    BPE merges the pair whose result scores highest; scores fall with the id)."""
    merges = []
    for piece, piece_id in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((piece_id, vocab[left], vocab[right], left, right))
    merges.sort()
    return [(left, right) for *_ids, left, right in merges]


def build_tokenizer(model_path: str | Path):
    """A `tokenizers.Tokenizer` equal to the sentencepiece model, and its special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    model_path = Path(model_path)
    proto = _proto(model_path)
    norm, trainer = proto.normalizer_spec, proto.trainer_spec
    if norm.name not in ("identity", "") or norm.remove_extra_whitespaces:
        raise CheckpointError(f"{model_path}: normalization {norm.name!r} (remove_extra_whitespaces="
                              f"{norm.remove_extra_whitespaces}) has no exact tokenizers equivalent "
                              f"here; export tokenizers trained by data_tools/train_tokenizer.py")
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    unk_id = trainer.unk_id
    if trainer.model_type == 2:  # BPE
        vocab = {piece: index for index, (piece, _score, _type) in enumerate(pieces)}
        model = models.BPE(vocab=vocab, merges=_bpe_merges(
            {p: i for p, i in vocab.items() if pieces[i][2] in (_NORMAL, _USER_DEFINED)}),
            unk_token=pieces[unk_id][0], fuse_unk=True, byte_fallback=trainer.byte_fallback)
    elif trainer.model_type == 1:  # unigram
        model = models.Unigram([(piece, score) for piece, score, _type in pieces], unk_id=unk_id,
                               byte_fallback=trainer.byte_fallback)
    else:
        raise CheckpointError(f"{model_path}: sentencepiece model_type {trainer.model_type} is "
                              f"not BPE or unigram; cannot convert it")
    steps = [normalizers.Prepend(SPACE)] if norm.add_dummy_prefix else []
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", SPACE)])
    decode = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm.add_dummy_prefix:
        decode.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(decode)
    # Control pieces (<pad>, <s>, </s>) are never produced from text by sentencepiece; as
    # special tokens they are skipped by decode(skip_special_tokens=True).
    specials = [AddedToken(piece, special=True, normalized=False)
                for piece, _score, kind in pieces if kind in (_CONTROL, _UNKNOWN)]
    tokenizer.add_special_tokens(specials)
    names = {"pad": trainer.pad_id, "unk": unk_id, "bos": trainer.bos_id, "eos": trainer.eos_id}
    special_ids = {name: index for name, index in names.items() if index >= 0}
    return tokenizer, {name: pieces[index][0] for name, index in special_ids.items()}, special_ids


def write_tokenizer(model_path: str | Path, out_dir: Path, max_length: int) -> dict:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json and the original
    tokenizer.model into out_dir. Returns the special ids."""
    import shutil

    if str(model_path).endswith(".json"):
        return _copy_tokenizer_json(Path(model_path), out_dir, max_length)
    tokenizer, tokens, special_ids = build_tokenizer(model_path)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    shutil.copyfile(model_path, out_dir / "tokenizer.model")
    special_map = {f"{name}_token": token for name, token in tokens.items()}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_map,
        # The training data has no BOS before documents (shard.py appends EOS after them).
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        # "</s>" typed in text is text to sentencepiece (and was, in the training data).
        "split_special_tokens": True,
        "model_max_length": max_length,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    return special_ids


def _copy_tokenizer_json(path: Path, out_dir: Path, max_length: int) -> dict:
    """Data sharded with a Hugging Face tokenizer.json (a family's own): that file as is, with
    the tokenizer_config.json beside it (or a minimal one), naming the tokens the shards were
    framed with where it does not (the end-of-text token, the BOS the post-processor adds), so that
    AutoTokenizer on the export gives the training data's ids; special_tokens_map.json for
    transformers releases that read it."""
    import shutil

    tokenizer = HFTokenizer(path)
    vocab = tokenizer.tokenizer.get_vocab(with_added_tokens=True)
    names = {index: token for token, index in vocab.items()}
    shutil.copyfile(path, out_dir / "tokenizer.json")
    config = dict(tokenizer.config) or {"tokenizer_class": "PreTrainedTokenizerFast",
                                        "clean_up_tokenization_spaces": False}
    if not token_content(config.get("eos_token")):
        config["eos_token"] = names.get(tokenizer.eos_id())
    if len(tokenizer.prefix_ids) == 1 and not token_content(config.get("bos_token")):
        config["bos_token"] = names[tokenizer.prefix_ids[0]]
    config.setdefault("model_max_length", max_length)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special_map, special_ids = {}, {}
    for name in ("pad", "unk", "bos", "eos"):
        token = config.get(f"{name}_token")
        if token_content(token) in vocab:
            special_map[f"{name}_token"] = token
            special_ids[name] = vocab[token_content(token)]
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    return special_ids
