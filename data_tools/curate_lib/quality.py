"""Heuristic quality rules on one document: Gopher's quality and repetition filters and C4's
line and page rules. Each returns the reason a document fails (None: it passes).

Defaults (recipe.py) are the published thresholds:
- Gopher: Rae et al. 2021, "Scaling Language Models: Methods, Analysis & Insights from
  Training Gopher", Appendix A.1.1 ("quality filters": 50-100,000 words, mean word length
  3-10, symbol-to-word ratio 0.1, 90% bullet lines, 30% ellipsis lines, 80% of words with a
  letter, 2 stop words) and Table A1 (repetition: duplicate lines/paragraphs 0.30 of the
  count and 0.20 of the characters; top 2/3/4-gram 0.20/0.18/0.16; duplicate 5..10-grams
  0.15..0.10 of the characters).
- C4: Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified
  Text-to-Text Transformer", Section 2.2: keep lines ending in terminal punctuation with at
  least 5 words, drop lines mentioning javascript, drop pages with "lorem ipsum", a curly
  bracket, a bad word, or fewer than 3 sentences. The bad-word list (LDNOOBW) is not shipped:
  pass it as bad_words_file.

Exact meanings (each tested at its edge): words are whitespace-separated tokens; a value over
a max_* threshold (or under a min_*) fails, one equal to it passes; lines are the non-empty
lines (stripped), paragraphs the non-empty blocks between blank lines.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

from data_tools.curate_lib.text import ngram_hashes, word_hashes

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
BULLETS = ("•", "‣", "○", "●", "◦", "▪", "-", "*", "·")
ELLIPSES = ("...", "…")
_ALPHA = re.compile(r"[^\W\d_]")
_PARAGRAPHS = re.compile(r"\n\s*\n")
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?=\s|$)")
C4_TERMINAL = (".", "!", "?", '"')


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def gopher_quality(text: str, p: dict) -> str | None:
    words = text.split()
    n = len(words)
    if n < p["min_words"]:
        return "too_few_words"
    if n > p["max_words"]:
        return "too_many_words"
    mean_length = sum(map(len, words)) / n
    if mean_length < p["min_mean_word_length"] or mean_length > p["max_mean_word_length"]:
        return "mean_word_length"
    symbols = text.count("#") + text.count("...") + text.count("…")
    if symbols / n > p["max_symbol_word_ratio"]:
        return "symbol_word_ratio"
    lines = _lines(text)
    if lines:
        if sum(line.startswith(BULLETS) for line in lines) / len(lines) > p["max_bullet_lines_ratio"]:
            return "bullet_lines"
        if sum(line.endswith(ELLIPSES) for line in lines) / len(lines) > p["max_ellipsis_lines_ratio"]:
            return "ellipsis_lines"
    if sum(1 for w in words if _ALPHA.search(w)) / n < p["min_alpha_words_ratio"]:
        return "alpha_words"
    if len(STOP_WORDS.intersection(w.lower() for w in words)) < p["min_stop_words"]:
        return "stop_words"
    return None


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(how many items repeat an earlier one, their characters)."""
    seen, count, chars = set(), 0, 0
    for item in items:
        if item in seen:
            count += 1
            chars += len(item)
        else:
            seen.add(item)
    return count, chars


def gopher_repetition(text: str, p: dict) -> str | None:
    total_chars = len(text)
    if not total_chars:
        return None
    lines = _lines(text)
    if lines:
        count, chars = _duplicates(lines)
        if count / len(lines) > p["max_duplicate_line_fraction"]:
            return "duplicate_lines"
        if chars / total_chars > p["max_duplicate_line_char_fraction"]:
            return "duplicate_line_chars"
    paragraphs = [para.strip() for para in _PARAGRAPHS.split(text) if para.strip()]
    if paragraphs:
        count, chars = _duplicates(paragraphs)
        if count / len(paragraphs) > p["max_duplicate_paragraph_fraction"]:
            return "duplicate_paragraphs"
        if chars / total_chars > p["max_duplicate_paragraph_char_fraction"]:
            return "duplicate_paragraph_chars"
    words = text.split()
    if not words:
        return None
    hashes = word_hashes(words)
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    word_chars = int(lengths.sum())
    # Characters of words only: the n-gram rules measure repeated wording, not spacing.
    cumulative = np.concatenate([[0], np.cumsum(lengths)])
    for n, limit in p["max_top_ngram_char_fraction"].items():
        grams = ngram_hashes(hashes, n)
        if len(grams) == 0:
            continue
        values, first, counts = np.unique(grams, return_index=True, return_counts=True)
        top = int(np.argmax(counts))  # ties: the smallest hash, a deterministic choice
        if counts[top] < 2:
            continue
        start = int(first[top])
        gram_chars = int(cumulative[start + n] - cumulative[start])
        if counts[top] * gram_chars / word_chars > limit:
            return f"top_{n}gram"
    for n, limit in p["max_duplicate_ngram_char_fraction"].items():
        grams = ngram_hashes(hashes, n)
        if len(grams) == 0:
            continue
        _, inverse, counts = np.unique(grams, return_inverse=True, return_counts=True)
        repeated = np.flatnonzero(counts[inverse.reshape(-1)] > 1)  # every occurrence
        if not len(repeated):
            continue
        covered = np.zeros(len(words) + 1, dtype=np.int64)  # words inside any repeated n-gram
        np.add.at(covered, repeated, 1)
        np.add.at(covered, repeated + n, -1)
        mask = np.cumsum(covered)[:-1] > 0
        if int(lengths[mask].sum()) / word_chars > limit:
            return f"duplicate_{n}gram"
    return None


def load_bad_words(path: str | None) -> frozenset[str]:
    if not path:
        return frozenset()
    with open(path, encoding="utf-8") as f:
        return frozenset(line.strip().lower() for line in f if line.strip())


def _has_bad_word(text: str, bad_words: frozenset[str]) -> bool:
    words = re.findall(r"\w+", text.lower())
    if not bad_words.isdisjoint(words):
        return True
    joined = f" {' '.join(words)} "  # entries of several words (phrases)
    return any(" " in entry and f" {entry} " in joined for entry in bad_words)


def c4_quality(text: str, p: dict, bad_words: frozenset[str]) -> tuple[str, str | None, Counter]:
    """(text with C4's lines kept, the page's failing reason or None, {line rule: bytes cut})."""
    lowered = text.lower()
    cut: Counter = Counter()
    if "lorem ipsum" in lowered:
        return text, "lorem_ipsum", cut
    if "{" in text:
        return text, "curly_bracket", cut
    kept = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        size = len(line.encode("utf-8")) + 1
        if not stripped.endswith(C4_TERMINAL):
            cut["line_no_terminal_punctuation"] += size
        elif len(stripped.split()) < p["min_words_per_line"]:
            cut["line_too_few_words"] += size
        elif "javascript" in stripped.lower():
            cut["line_javascript"] += size
        else:
            kept.append(stripped)
    result = "\n".join(kept)
    if bad_words and _has_bad_word(result, bad_words):
        return text, "bad_word", Counter()
    if len(_SENTENCE_END.findall(result)) < p["min_sentences"]:
        return text, "too_few_sentences", Counter()
    return result, None, cut
