"""The standard VQA answer processor: punctuation, number words, articles, contractions.

Two scorers share these rules and differ only in when they apply them:

- the original VQA API (`vqaEval.py`, GT-Vision-Lab/VQA) runs `process_punctuation`
  then `process_digit_article` on an answer;
- the EvalAI answer processor (used by LLaVA's `m4c_evaluator.py` for TextVQA and
  before its VQAv2 submission) first lower-cases and deletes `,` and `?`, splits `'s`,
  then does the same two steps: `normalize_answer`.

Quirks kept on purpose, because the published numbers were computed with them:
when a comma sits between two digits anywhere in the text, every punctuation mark is
deleted instead of becoming a space; a period is deleted unless a digit follows it
("3.5" stays, "3." becomes "3"), and at most 32 periods are deleted (both scorers pass
`re.UNICODE`, which is 32, as the `count` argument of `re.sub`); contraction keys with
capitals ("Im", "Ive") never match because the text is lower-cased first.
"""

from __future__ import annotations

import re

# Word -> digit map ("manualMap" in vqaEval.py, NUMBER_MAP in m4c_evaluator.py).
NUMBER_MAP: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}

ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

# Deleted or turned into a space; the period has its own rule (PERIOD_STRIP).
PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
    ">", "<", "@", "`", ",", "?", "!",
)

# Missing-apostrophe spellings -> the spelling human answers use (vqaEval.py's table).
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't",
    "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}

# The originals write this as "(?!<=\d)(\.)(?!\d)"; the leading group is a lookahead (not a
# lookbehind) that can never fail in front of a ".", so the rule is "a period not followed
# by a digit".
PERIOD_STRIP = re.compile(r"\.(?!\d)")
COMMA_BETWEEN_DIGITS = re.compile(r"\d,\d")
PERIOD_STRIP_LIMIT = re.UNICODE  # == 32: passed as re.sub's count by both scorers

__all__ = [
    "ARTICLES",
    "CONTRACTIONS",
    "NUMBER_MAP",
    "PUNCTUATION",
    "normalize_answer",
    "process_digit_article",
    "process_punctuation",
]


def process_punctuation(text: str) -> str:
    """vqaEval's processPunctuation: drop or space out punctuation, strip periods."""
    delete_all = COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for p in PUNCTUATION:
        # The test looks at the input text, not at the partly processed output.
        if delete_all or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, count=PERIOD_STRIP_LIMIT)


def process_digit_article(text: str) -> str:
    """vqaEval's processDigitArticle: lower-case, number words -> digits, drop articles,
    restore contractions, collapse whitespace."""
    words = [NUMBER_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """The EvalAI answer processor (LLaVA's m4c_evaluator): the form predictions are
    compared and submitted in."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))
