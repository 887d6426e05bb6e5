"""Per-document stages, built on each Ray worker from the recipe: Gopher and C4 quality,
language identification (py3langid) and decontamination against evaluation n-grams.

`apply(text)` returns (text, reason, {line rule: bytes cut}); reason None keeps the document.
Only c4_quality changes the text (it keeps C4's lines); the others return it as given.
"""

from __future__ import annotations

from collections import Counter
from functools import lru_cache

import numpy as np

from data_tools.curate_lib import quality
from data_tools.curate_lib.text import ngram_hashes, shingle_words, word_hashes

_NOTHING_CUT: Counter = Counter()


@lru_cache(maxsize=1)
def _identifier():
    # The model ships inside the package (py3langid/data/model.npz.xz): no download.
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def known_languages() -> set[str]:
    return set(_identifier().nb_classes)


def eval_ngrams(texts, n: int) -> np.ndarray:
    """Sorted distinct hashes of every word n-gram of the evaluation texts (texts shorter than
    n words have none: they are not checked)."""
    found = [ngram_hashes(word_hashes(shingle_words(text)), n) for text in texts]
    return np.unique(np.concatenate(found)) if found else np.empty(0, dtype=np.uint64)


class GopherQuality:
    def __init__(self, params: dict, _resource=None):
        self.params = params

    def apply(self, text: str):
        return text, quality.gopher_quality(text, self.params), _NOTHING_CUT


class GopherRepetition(GopherQuality):
    def apply(self, text: str):
        return text, quality.gopher_repetition(text, self.params), _NOTHING_CUT


class C4Quality:
    def __init__(self, params: dict, _resource=None):
        self.params = params
        self.bad_words = quality.load_bad_words(params["bad_words_file"])

    def apply(self, text: str):
        return quality.c4_quality(text, self.params, self.bad_words)


class Language:
    def __init__(self, params: dict, _resource=None):
        self.languages = frozenset(params["languages"])
        self.min_score = params["min_score"]

    def apply(self, text: str):
        language, score = _identifier().classify(text)
        if language not in self.languages:
            return text, "language", _NOTHING_CUT
        if score < self.min_score:
            return text, "low_score", _NOTHING_CUT
        return text, None, _NOTHING_CUT


class Decontaminate:
    """Drops a document that shares any word n-gram with the evaluation files (the n-gram
    hashes are built once on the driver and shipped to the workers)."""

    def __init__(self, params: dict, ngrams: np.ndarray):
        self.n = params["ngram"]
        self.ngrams = ngrams

    def apply(self, text: str):
        if len(self.ngrams):
            hashes = word_hashes(shingle_words(text))
            grams = ngram_hashes(hashes, self.n)
            if len(grams):
                at = np.searchsorted(self.ngrams, grams).clip(max=len(self.ngrams) - 1)
                if (self.ngrams[at] == grams).any():
                    return text, "contaminated", _NOTHING_CUT
        return text, None, _NOTHING_CUT


FILTERS = {"gopher_quality": GopherQuality, "gopher_repetition": GopherRepetition,
           "c4_quality": C4Quality, "language": Language, "decontaminate": Decontaminate}
