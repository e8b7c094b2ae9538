"""A deterministic, synthetic English-like text corpus for training tokenizers offline.

Words are built from syllables, sentences from words (with a Zipf-like frequency), and
the text carries punctuation, digits and some multi-byte characters (accents, CJK,
emoji) so that a byte-level BPE learns merges across UTF-8 byte boundaries.

NOTE: the output depends only on the arguments. Only `random.Random(seed)` draws are
used (`random()`, `randrange`, `choice`), whose results are stable across Python
versions and platforms; no float math beyond comparisons, and no set or dict iteration
order leaks into the text.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

_ONSETS = (
    "b c d f g h j k l m n p r s t v w y z "
    "bl br ch cl cr dr fl fr gl gr kr pl pr sc sh sk sl sp st str th tr wh"
).split()
_VOWELS = "a e i o u a e i o u ai ea ee oo ou io ie".split()
_CODAS = ["", "", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng", "rk", "ck", "x"]
# Vowels swapped in now and then, so that words carry two-byte UTF-8 characters.
_ACCENTED = {"a": "àáâä", "e": "éèêë", "i": "íï", "o": "óöô", "u": "úüû"}
# Tokens sprinkled between words: three- and four-byte UTF-8 characters.
_EXOTIC = [
    "中文", "日本語", "한국어", "数据", "模型", "naïve", "café", "über", "Straße",
    "señor", "€", "£", "—", "…", "→", "✓", "🙂", "🚀", "👍", "🎉", "∑", "π", "Ω",
]
_FUNCTION_WORDS = "the of and to in is that for it as with was on by at from or an be this".split()


def _syllable(rng: random.Random) -> str:
    """One consonant-vowel-consonant syllable."""
    onset = rng.choice(_ONSETS) if rng.random() < 0.85 else ""
    return onset + rng.choice(_VOWELS) + rng.choice(_CODAS)


def make_lexicon(num_words: int, seed: int = 0) -> list[str]:
    """Return `num_words` distinct lowercase words, each of one to four syllables.

    About 3% of the words carry an accented vowel (two UTF-8 bytes).
    """
    rng = random.Random(seed)
    seen: set[str] = set()
    words: list[str] = []
    while len(words) < num_words:
        # Longer words become more likely as the short ones run out.
        num_syllables = 1 + rng.randrange(2 + min(2, len(words) // 2000))
        word = "".join(_syllable(rng) for _ in range(num_syllables))
        if rng.random() < 0.03:
            pos = rng.randrange(len(word))
            if word[pos] in _ACCENTED:
                word = word[:pos] + rng.choice(_ACCENTED[word[pos]]) + word[pos + 1 :]
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def _number(rng: random.Random) -> str:
    """A number in one of a few everyday shapes (year, decimal, percent, money, count)."""
    shape = rng.randrange(5)
    if shape == 0:
        return str(1800 + rng.randrange(250))
    if shape == 1:
        return f"{rng.randrange(100)}.{rng.randrange(100):02d}"
    if shape == 2:
        return f"{rng.randrange(101)}%"
    if shape == 3:
        return f"${rng.randrange(1, 10000)}"
    return str(rng.randrange(1, 1000))


def _sentence(rng: random.Random, lexicon: list[str], new_word: str | None) -> str:
    """One sentence: capitalised, with commas, a number or an exotic token now and then."""
    n = len(lexicon)
    length = 4 + rng.randrange(13)
    words: list[str] = []
    for _ in range(length):
        roll = rng.random()
        if roll < 0.25:
            words.append(rng.choice(_FUNCTION_WORDS))
        elif roll < 0.28:
            words.append(_number(rng))
        elif roll < 0.30:
            words.append(rng.choice(_EXOTIC))
        else:
            # Nested uniform draws skew towards low ranks (Zipf-like) using integers only,
            # so no float rounding of a libm function can differ between platforms.
            words.append(lexicon[rng.randrange(1 + rng.randrange(1 + rng.randrange(n)))])
        if rng.random() < 0.06:
            words[-1] += ","
    if new_word is not None:
        words.insert(rng.randrange(len(words) + 1), new_word)
    if rng.random() < 0.05:
        i = rng.randrange(len(words))
        words[i] = "(" + words[i].rstrip(",") + ")"
    text = " ".join(words).rstrip(",")
    text = text[0].upper() + text[1:]
    end = rng.choice(".........!?;:")
    if rng.random() < 0.05:
        return f'"{text}{end}"'
    return text + end


def corpus_lines(num_words: int, seed: int = 0, sentences_per_word: float = 1.0) -> Iterator[str]:
    """Yield paragraphs (one per line) built over a lexicon of `num_words` words.

    Every lexicon word appears at least once (each sentence introduces the next unseen
    one), so a BPE trainer can keep merging until about `num_words` tokens exist.
    `sentences_per_word` scales the amount of text beyond that minimum.
    """
    lexicon = make_lexicon(num_words, seed)
    rng = random.Random(seed + 1)
    num_sentences = max(num_words, int(num_words * sentences_per_word))
    paragraph: list[str] = []
    for i in range(num_sentences):
        new_word = lexicon[i] if i < num_words else None
        paragraph.append(_sentence(rng, lexicon, new_word))
        if rng.random() < 0.2:
            yield " ".join(paragraph)
            paragraph = []
    if paragraph:
        yield " ".join(paragraph)
