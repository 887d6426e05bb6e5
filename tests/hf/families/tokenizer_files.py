"""The families' own tokenizers, made here (no network): a small byte-level BPE trained with
the `tokenizers` library on local text, with Llama 3's or Qwen2's pre-tokenizer regex,
normalizer, special tokens and post-processor, saved by transformers as a model directory
holds them (tokenizer.json + tokenizer_config.json)."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

# Llama 3's and Qwen2's split regexes as their tokenizer.json files state them: Llama 3
# groups digits by up to three, Qwen2 splits every digit.
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
               r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
FAMILIES = {
    # base models: documents end with <|end_of_text|>, and each starts with <|begin_of_text|>
    "llama3": dict(regex=LLAMA3_REGEX, nfc=False, bos="<|begin_of_text|>", eos="<|end_of_text|>",
                   extra=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                   tokenizer_class="PreTrainedTokenizerFast"),
    # Qwen2/2.5/3 base: <|endoftext|> ends documents, no BOS
    "qwen2": dict(regex=QWEN2_REGEX, nfc=True, bos=None, eos="<|endoftext|>",
                  extra=["<|im_start|>", "<|im_end|>"], tokenizer_class="Qwen2Tokenizer"),
}
EOS = {family: spec["eos"] for family, spec in FAMILIES.items()}


def training_text() -> list[str]:
    """Some standard-library source and a few lines of other scripts to learn merges from."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [path.read_text(encoding="utf-8") for path in sorted(stdlib.glob("[d-f]*.py"))[:6]]
    return texts + ["Café naïve Straße 日本語の文章 Zürich 12345 67890 déjà vu\n" * 20]


def build(family: str):
    """The `tokenizers.Tokenizer` of `family` (about 600 ids plus its special tokens)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers import processors, trainers

    spec = FAMILIES[family]
    tokenizer = Tokenizer(models.BPE(byte_fallback=False))
    if spec["nfc"]:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(spec["regex"]), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=600, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(training_text(), trainer)
    # as in the real files, the special tokens come after the merged vocabulary
    specials = [token for token in (spec["bos"], spec["eos"], *spec["extra"]) if token]
    tokenizer.add_special_tokens(specials)
    byte_level = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    if spec["bos"]:
        bos = (spec["bos"], tokenizer.token_to_id(spec["bos"]))
        tokenizer.post_processor = processors.Sequence([byte_level, processors.TemplateProcessing(
            single=f"{bos[0]} $A", pair=f"{bos[0]} $A:0 {bos[0]}:1 $B:1", special_tokens=[bos])])
    else:
        tokenizer.post_processor = byte_level
    return tokenizer


def save(family: str, directory: Path) -> Path:
    """DIR/tokenizer.json and DIR/tokenizer_config.json as transformers saves them; returns
    the tokenizer.json path."""
    from transformers import PreTrainedTokenizerFast

    spec = FAMILIES[family]
    fast = PreTrainedTokenizerFast(tokenizer_object=build(family), bos_token=spec["bos"],
                                   eos_token=spec["eos"], clean_up_tokenization_spaces=False)
    fast.save_pretrained(str(directory))
    # the class the families' own files name (transformers 5 writes its generic backend's)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = spec["tokenizer_class"]
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return directory / "tokenizer.json"
