"""The per-document rules (data_tools/curate_lib/quality.py, filters.py), each threshold at its
edge: a value equal to the threshold passes, the next step past it fails. Each rule is tested
alone (the other rules of its stage set permissive) so that its own edge is what decides."""

from __future__ import annotations

import math

import pytest

from data_tools.curate_lib import quality, recipe
from data_tools.curate_lib.filters import Decontaminate, Language, eval_ngrams


def defaults(stage: str) -> dict:
    return {k: v.default for k, v in recipe.STAGES[stage].items()}


# ---------------------------------------------------------------- Gopher quality

def text_of(words: list[str], per_line: int = 1000) -> str:
    lines = [" ".join(words[i:i + per_line]) for i in range(0, len(words), per_line)]
    return "\n".join(lines)


def good_words(n: int) -> list[str]:
    return ["the", "and"] + ["abcd"] * (n - 2)


def gq(text: str, **overrides):
    return quality.gopher_quality(text, {**defaults("gopher_quality"), **overrides})


def test_defaults_pass_a_plain_document():
    assert gq(text_of(good_words(60))) is None


def test_word_count_edges():
    assert gq(text_of(good_words(50))) is None
    assert gq(text_of(good_words(49))) == "too_few_words"
    assert gq(text_of(good_words(100_000))) is None
    assert gq(text_of(good_words(100_001))) == "too_many_words"


def test_mean_word_length_edges():
    words = ["the", "and"] + ["abc"] * 48  # mean exactly 3.0
    assert gq(text_of(words)) is None
    assert gq(text_of(words[:-1] + ["ab"])) == "mean_word_length"
    long = ["the", "and"] + ["abcdefghij"] * 47 + ["x" * 24]  # 500 chars / 50 words = 10.0
    assert gq(text_of(long)) is None
    assert gq(text_of(long[:-1] + ["x" * 25])) == "mean_word_length"


def test_symbol_word_ratio_edge():
    words = good_words(50)
    at_edge = words[:45] + ["abcd#"] * 5  # 5 symbols / 50 words = 0.1
    assert gq(text_of(at_edge)) is None
    assert gq(text_of(words[:44] + ["abcd#"] * 6)) == "symbol_word_ratio"
    assert gq(text_of(words[:44] + ["abcd…"] * 5 + ["ab..."])) == "symbol_word_ratio"


def test_bullet_and_ellipsis_line_edges():
    lines = [["the", "and", "abcd", "abcd", "abcd"] for _ in range(10)]

    def doc(prefixed: int, suffixed: int) -> str:
        out = []
        for i, line in enumerate(lines):
            words = list(line)
            if i < prefixed:
                words[0] = "•" + words[0]
            if i < suffixed:
                words[-1] += "…"
            out.append(" ".join(words))
        return "\n".join(out)

    assert gq(doc(9, 0)) is None  # 0.9 of the lines
    assert gq(doc(10, 0)) == "bullet_lines"
    assert gq(doc(0, 3)) is None  # 0.3
    assert gq(doc(0, 4)) == "ellipsis_lines"


def test_alpha_words_and_stop_words_edges():
    words = good_words(50)
    assert gq(text_of(words[:40] + ["1234"] * 10)) is None  # 40/50 = 0.8 have a letter
    assert gq(text_of(words[:39] + ["1234"] * 11)) == "alpha_words"
    assert gq(text_of(["the"] + ["abcd"] * 49)) == "stop_words"  # one distinct stop word
    assert gq(text_of(["The", "AND"] + ["abcd"] * 48)) is None  # case does not matter


# ---------------------------------------------------------------- Gopher repetition

PERMISSIVE_REPETITION = {"max_duplicate_line_fraction": 1.0, "max_duplicate_paragraph_fraction": 1.0,
                         "max_duplicate_line_char_fraction": 1.0,
                         "max_duplicate_paragraph_char_fraction": 1.0,
                         "max_top_ngram_char_fraction": {}, "max_duplicate_ngram_char_fraction": {}}


def rep(text: str, **rule):
    return quality.gopher_repetition(text, {**PERMISSIVE_REPETITION, **rule})


def test_repetition_defaults_pass_varied_text_and_fail_repeated_text():
    varied = " ".join(f"w{i}" for i in range(300))
    p = defaults("gopher_repetition")
    assert quality.gopher_repetition(varied, p) is None
    assert quality.gopher_repetition("same line here\n" * 10, p) == "duplicate_lines"


def test_duplicate_line_fraction_edge():
    unique = [f"line number {i}" for i in range(10)]
    limit = {"max_duplicate_line_fraction": 0.3}
    assert rep("\n".join(unique[:6] + ["again"] * 4), **limit) is None  # 3 repeats of 10 lines
    assert rep("\n".join(unique[:5] + ["again"] * 5), **limit) == "duplicate_lines"  # 4 of 10
    assert rep("\n".join(unique[:5] + ["again"] * 5), max_duplicate_line_fraction=0.4) is None


def test_duplicate_line_and_paragraph_char_fraction_edges():
    a = "x" * 10
    # [A, A, X]: 10 duplicate characters of 50 = 0.2 exactly
    assert rep("\n".join([a, a, "y" * 28]), max_duplicate_line_char_fraction=0.2) is None
    assert rep("\n".join([a, a, "y" * 27]), max_duplicate_line_char_fraction=0.2) == \
        "duplicate_line_chars"
    assert rep("\n\n".join([a, a, "y" * 26]), max_duplicate_paragraph_char_fraction=0.2) is None
    assert rep("\n\n".join([a, a, "y" * 25]), max_duplicate_paragraph_char_fraction=0.2) == \
        "duplicate_paragraph_chars"


def test_duplicate_paragraph_fraction_edge():
    unique = [f"paragraph {i}" for i in range(10)]
    limit = {"max_duplicate_paragraph_fraction": 0.3}
    assert rep("\n\n".join(unique[:6] + ["p"] * 4), **limit) is None  # 3 repeats of 10
    assert rep("\n\n".join(unique[:5] + ["p"] * 5), **limit) == "duplicate_paragraphs"
    # Lines repeat only inside paragraphs here: the paragraph rule is what counts.
    assert rep("\n\n".join(unique[:5] + ["p\nq"] * 5), **limit) == "duplicate_paragraphs"


def test_top_ngram_char_fraction_edge():
    # "ab cd" twice: 8 of 40 word characters = 0.2 exactly
    at_edge = " ".join(["ab", "cd", "qwertyuiopasdfgh", "ab", "cd", "zxcvbnmlkjhgfdsa"])
    assert rep(at_edge, max_top_ngram_char_fraction={2: 0.2}) is None
    over = " ".join(["ab", "cd", "qwertyuiopasdfgh", "ab", "cd", "zxcvbnmlkjhgfds"])
    assert rep(over, max_top_ngram_char_fraction={2: 0.2}) == "top_2gram"
    assert rep(over, max_top_ngram_char_fraction={3: 0.18}) is None  # no repeated 3-gram


def test_duplicate_ngram_char_fraction_edge():
    gram = ["aaa", "bbb", "ccc", "ddd", "eee"]  # 15 characters, twice = 30 of 200 = 0.15

    def doc(filler: int) -> str:
        return " ".join(gram + ["f" * 85] + gram + ["g" * filler])

    assert rep(doc(85), max_duplicate_ngram_char_fraction={5: 0.15}) is None
    assert rep(doc(84), max_duplicate_ngram_char_fraction={5: 0.15}) == "duplicate_5gram"
    assert rep(doc(84), max_duplicate_ngram_char_fraction={6: 0.15}) is None  # no 6-gram repeats


# ---------------------------------------------------------------- C4

def c4(text: str, bad=frozenset(), **overrides):
    return quality.c4_quality(text, {**defaults("c4_quality"), **overrides}, bad)


SENTENCES = ["The cat sat on the mat today.", "It was a sunny day outside here!",
             "Did anyone see the dog run away?"]


def test_c4_keeps_terminal_punctuation_lines_with_enough_words():
    text = "\n".join(SENTENCES + ["Menu Home About Contact", "Only four words here.",
                                 "Please enable JavaScript to view this page."])
    kept, reason, cut = c4(text)
    assert reason is None
    assert kept == "\n".join(SENTENCES)
    assert cut == {"line_no_terminal_punctuation": len("Menu Home About Contact") + 1,
                   "line_too_few_words": len("Only four words here.") + 1,
                   "line_javascript": len("Please enable JavaScript to view this page.") + 1}
    assert c4("\n".join(SENTENCES + ["Exactly five words are here."]))[0].endswith("here.")
    assert c4('He said "this is a quote"')[2] == {}  # a quote mark ends a line too (too few sentences)


def test_c4_page_rules():
    assert c4("\n".join(SENTENCES))[1] is None  # 3 sentences
    assert c4("\n".join(SENTENCES[:2]))[1] == "too_few_sentences"
    assert c4("\n".join(SENTENCES[:2]), min_sentences=2)[1] is None
    assert c4("\n".join(SENTENCES + ["Lorem ipsum dolor sit amet."]))[1] == "lorem_ipsum"
    assert c4("\n".join(SENTENCES + ["int main() { return 0; }"]))[1] == "curly_bracket"
    bad = frozenset({"mat", "two words"})
    assert c4("\n".join(SENTENCES), bad)[1] == "bad_word"
    assert c4("\n".join(SENTENCES[1:] + ["Two words make a phrase here."]), bad)[1] == "bad_word"
    assert c4("\n".join(SENTENCES[1:] + ["Two more words make a phrase."]),
              frozenset({"two words"}), min_sentences=2)[1] is None
    # A bad word only on a line C4 drops does not remove the page.
    assert c4("\n".join(SENTENCES + ["a badword here"]), frozenset({"badword"}))[1] is None
    assert c4("\n".join(SENTENCES + ["A badword here, in a kept line."]),
              frozenset({"badword"}))[1] == "bad_word"


# ---------------------------------------------------------------- language

ENGLISH = "The weather was fine and the children played in the garden until evening."
GERMAN = "Das Wetter war schön und die Kinder spielten im Garten bis zum Abend."


def test_language_keep_list_and_score_edge():
    from data_tools.curate_lib.filters import _identifier

    english = Language({"languages": ["en"], "min_score": 0.5})
    assert english.apply(ENGLISH)[1] is None
    assert english.apply(GERMAN)[1] == "language"
    assert Language({"languages": ["de", "en"], "min_score": 0.5}).apply(GERMAN)[1] is None
    _, score = _identifier().classify(ENGLISH)
    assert Language({"languages": ["en"], "min_score": score}).apply(ENGLISH)[1] is None
    assert Language({"languages": ["en"], "min_score": math.nextafter(score, 2)}).apply(
        ENGLISH)[1] == "low_score"


# ---------------------------------------------------------------- decontamination

EVAL = ("Question: which planet in our solar system has the largest number of known moons "
        "orbiting it today? Answer: Saturn.")


def test_decontamination_13gram_edge():
    words = EVAL.split()
    stage = Decontaminate({"ngram": 13}, eval_ngrams([EVAL], 13))
    thirteen = " ".join(words[3:16])
    twelve = " ".join(words[3:15])
    assert stage.apply(f"Some text. {thirteen.upper()}, and more.")[1] == "contaminated"
    assert stage.apply(f"Some text. {twelve} and more.")[1] is None
    assert stage.apply("nothing in common at all")[1] is None
    # Evaluation texts shorter than n words give no n-grams (nothing to match).
    assert len(eval_ngrams(["too short"], 13)) == 0


@pytest.mark.parametrize("stage", ["gopher_quality", "gopher_repetition", "c4_quality"])
def test_empty_text_never_crashes(stage):
    p = defaults(stage)
    if stage == "c4_quality":
        assert quality.c4_quality("", p, frozenset())[1] == "too_few_sentences"
    else:
        getattr(quality, stage)("", p)
