"""`checkpoint.load_from=hf:DIR`: start a run from a Hugging Face Llama, Qwen2 or Qwen3 model
directory (weights only: fresh optimizer, step 0), under any TP/PP/DP layout.

config.json must describe the model this run's config builds; every difference is refused
with one line naming both fields and the fix. The data must have been made with DIR's
tokenizer (check_tokenizer): a model trained on another tokenizer's ids learns nothing. Weights are read from safetensors only (never
a pickle), into our full-shape state (convert.from_hf), then each rank keeps its slice
(checkpoint/weights.install).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pretrain.errors import CheckpointError
from pretrain.hf.convert import from_hf
from pretrain.hf.families import HF_NAMES, check_exportable, family_of, model_fields

PREFIX = "hf:"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
# Compared id for id when the data's tokenizer file is not DIR's byte for byte: prose, code,
# accents, CJK, digits and whitespace runs, where tokenizers differ first.
PROBE = ("Continued pretraining, 2026: deja vu, déjà vu, naïve café; 東京 and Zürich.\n"
         "def area(r):\n    return 3.14159 * r ** 2  # 12,345.67 × 2\n\n\tEnd.")


def is_hf(load_from: str) -> bool:
    return load_from.startswith(PREFIX)


def hf_dir(load_from: str) -> Path:
    path = Path(load_from[len(PREFIX):])
    if not (path / "config.json").is_file():
        raise CheckpointError(f"checkpoint.load_from={load_from}: no config.json there; point it "
                              f"at a Hugging Face model directory (save_pretrained output)")
    return path


def read_config(path: Path) -> dict:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path / 'config.json'}: unreadable ({err})") from None
    return config


def adopt_architecture(cfg, given: set[str], load_from: str) -> None:
    """`checkpoint.load_from=hf:DIR` defines the model: every architecture field of
    DIR/config.json goes into cfg.model, its vocab_size included (so the embedding has the
    model's rows). A field the run config sets itself (`given`: config/load.py
    model_keys_given) must agree, else one line naming both values; what is not architecture
    (backend, compile, dropout, max_seq_length) is the run config's alone."""
    config = read_config(hf_dir(load_from))
    fields = model_fields(config, load_from)
    vocab = config.get("vocab_size")
    if isinstance(vocab, int) and not isinstance(vocab, bool) and vocab > 0:
        fields["vocab_size"] = vocab
    ours = _effective(cfg.model)
    for key, value in fields.items():
        if key in given and ours[key] != value:
            raise CheckpointError(_mismatch(config, key, value, ours, load_from)
                                  + " or drop it from the run config (the checkpoint defines "
                                    "the architecture)")
        setattr(cfg.model, key, value)


def _effective(m) -> dict:
    """cfg.model's fields with the derived ones as config.json states them (0 resolved)."""
    return {**vars(m), "num_query_groups": m.query_groups, "head_dim": m.kv_channels,
            "ffn_hidden_size": m.ffn_size}


def _mismatch(config: dict, key: str, value, ours: dict, where: str) -> str:
    hf_key = HF_NAMES.get(key, key)
    hf_value = family_of(config, where) if hf_key == "model_type" else value
    return (f"{where}: config.json {hf_key}={hf_value!r} but model.{key}={ours[key]!r} here; "
            f"set model.{key}={value!r}")


def check_fits(config: dict, cfg, padded_vocab_size: int, data_vocab_size: int, where: str) -> None:
    """Every architecture field of config.json against this run's config."""
    m = cfg.model
    check_exportable(vars(m), f"this run's config (for {where})")
    ours = _effective(m)
    for key, value in model_fields(config, where).items():
        if ours[key] != value:
            raise CheckpointError(_mismatch(config, key, value, ours, where))
    vocab = config.get("vocab_size")
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
        raise CheckpointError(f"{where}: config.json vocab_size={vocab!r} is not a positive "
                              f"integer")
    if vocab > padded_vocab_size:
        raise CheckpointError(f"{where}: config.json vocab_size={vocab} exceeds this run's "
                              f"{padded_vocab_size} rows; set model.vocab_size={vocab}")
    if vocab < data_vocab_size:
        raise CheckpointError(f"{where}: config.json vocab_size={vocab} is smaller than the data's "
                              f"tokenizer ({data_vocab_size}); tokenize the data with the model's "
                              f"tokenizer")


def check_tokenizer(path: Path, cfg, data, where: str) -> None:
    """DIR's tokenizer against the one the data was made with: the same file (sha256), or
    the same ids on PROBE and the same end-of-text id. Anything else is one line."""
    from pretrain.data.build import build_tokenizer
    from pretrain.data.tokenizers import TextTokenizer, TokenizerError, open_tokenizer
    from pretrain.files import file_sha256

    source = data.train[0]
    files = [path / name for name in TOKENIZER_FILES if (path / name).is_file()]
    if not files:
        raise CheckpointError(f"{where}: no {' or '.join(TOKENIZER_FILES)} in {path}; the "
                              f"model's tokenizer is needed to check that the data was made "
                              f"with it (save it there with tokenizer.save_pretrained)")
    if any(file_sha256(file) == source.tokenizer_sha256 for file in files):
        return
    ours = build_tokenizer(cfg, data)
    if ours is None:
        raise CheckpointError(f"{where}: the data ({source.name}) was made with tokenizer "
                              f"{source.tokenizer_sha256[:12]}, not {files[0].name} of {path}, "
                              f"and that tokenizer is not readable here to compare ids; set "
                              f"data.tokenizer=PATH")
    try:
        theirs = open_tokenizer(files[0])
    except TokenizerError as err:
        raise CheckpointError(f"{where}: {err}") from None
    want, got = TextTokenizer(theirs).encode(PROBE), ours.encode(PROBE)
    why = None
    if want != got:
        at = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
        why = (f"the ids of a probe text differ from token {at} on ({want[at:at + 3]} in "
               f"{files[0].name}, {got[at:at + 3]} in the data's)")
    elif theirs.eos_id() != source.eod_id:
        why = (f"the end-of-text id differs ({theirs.eos_id()} in {files[0].name}, "
               f"{source.eod_id} in the data's manifest)")
    if why:
        raise CheckpointError(f"{where}: the data ({source.name}) was not made with {path}'s "
                              f"tokenizer: {why}; make the shards with data_tools/shard.py "
                              f"--tokenizer {files[0]}")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{index}: unreadable ({type(err).__name__}: {err}); it needs "
                                  f"a weight_map of tensor names to files") from None
        # Names from outside: each must be a file of this directory, never a path that
        # leads elsewhere (../, absolute, a subdirectory).
        for name in files:
            if not isinstance(name, str) or Path(name).name != name or name in ("..", "."):
                raise CheckpointError(f"{index}: weight_map names {name!r}, not a file of "
                                      f"{path}; refusing to read outside the model directory")
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json; "
                              f"save the model with save_pretrained(safe_serialization=True)")
    tensors = {}
    for name in files:
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name}: listed in the index but missing")
        try:
            tensors.update(load_file(str(path / name)))
        except Exception as err:  # safetensors raises its own SafetensorError, or OSError
            raise CheckpointError(f"{path / name}: unreadable safetensors ({type(err).__name__}: "
                                  f"{str(err)[:200]}); the file is truncated or not safetensors, "
                                  f"copy the model again") from None
    return tensors


def load_state(load_from: str, cfg, padded_vocab_size: int, data_vocab_size: int) -> dict:
    """The HF model `load_from` names as our full-shape state, checked against cfg."""
    path = hf_dir(load_from)
    config = read_config(path)
    check_fits(config, cfg, padded_vocab_size, data_vocab_size, load_from)
    model = {**vars(cfg.model), "head_dim": cfg.model.kv_channels}
    return from_hf(read_safetensors(path), model, padded_vocab_size, load_from)


def initial_weights(cfg, padded_vocab_size: int, data):
    """For the Checkpointer (its `initial_weights`): with `checkpoint.load_from=hf:DIR`, a
    callable returning (DIR, the model's full-shape state), called only when the run has no
    checkpoint of its own (a resume compares the checkpoint's tokenizer hash instead); else
    None. `data`: the run's opened data (data/build.py), whose tokenizer must be DIR's."""
    load_from = cfg.checkpoint.load_from
    if not (load_from and is_hf(load_from)):
        return None

    def read() -> tuple[Path, dict]:
        path = hf_dir(load_from)
        check_tokenizer(path, cfg, data, load_from)
        return path, load_state(load_from, cfg, padded_vocab_size, data.vocab_size)

    return read
