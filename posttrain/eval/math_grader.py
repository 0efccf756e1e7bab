"""Math grading: last \\boxed{} of the output (after any <think>…</think>), compared with the
gold answer by math-verify (gold first), in worker processes with a hard timeout per item.

Both sides go through the same `clean_answer` before math-verify sees them, because math-verify
is given text, not a formula: whitespace and newlines around the box content, `$` delimiters,
a trailing period, and programming-style numbers (`4.5e33`, `-1./3`) would otherwise be read
wrongly (`4.5e33` as 4.5·e·33). The cleaned text is then parsed as `\\boxed{...}` so that
math-verify's box normalisation (units such as `\\text{ cents}` dropped, `\\dfrac`, `^\\circ`)
applies to the gold and the answer alike.

Extraction happens here in the parent, so identical (gold, answer) pairs — common with 16
samples per problem — are verified once; a pair whose two cleaned sides are plain integers is
decided here too (`integer_verdict`: math-verify's verdict on two integers is their equality).
"""

from __future__ import annotations

import re
from functools import lru_cache

from posttrain.eval.benchmarks import last_boxed, strip_think
from posttrain.eval.pool import TimeoutPool

VERIFY_TIMEOUT = 5  # math-verify's own (signal-based) limit inside the worker, seconds
HARD_TIMEOUT = 20  # the worker is killed after this, seconds

# A number in e-notation standing alone (not part of a name such as `x1e5`, not `e^{t}`).
E_NOTATION = re.compile(r"(?<![\w.\\])(\d+(?:\.\d*)?|\.\d+)[eE]([-+]?\d+)(?![\w.])")
# A number written with a trailing decimal point: `12.`, `-1./3`.
TRAILING_POINT = re.compile(r"(\d)\.(?![\d])")
# Math-mode delimiters that can sit inside a box or a gold string: $, \( \), \[ \].
MATH_DELIMITERS = re.compile(r"\$|\\\(|\\\)|\\\[|\\\]")
# A unit written as text after a number: `5.4 \text{ cents}`, `15\mbox{ cm}^2`. (math-verify's own unit
# list also strips bare trailing letters, so `\frac{37}{4} m` became 37/4: it is switched off.)
# Words that change the number (`5 \text{ million}`) are not units and stay.
TEXT_UNIT = re.compile(r"(?<=[\d}\s])\s*\\(?:text|mbox|mathrm)\s*\{\s*"
                       r"(?!(?:hundred|thousand|million|billion|trillion|dozen|percent|%)s?\b)[a-zA-Z][a-zA-Z .]*\}"
                       r"(?:\^\{?\d\}?)?$")
# Names latex2sympy reads as constants or functions: E_{1} (an energy) fails as Euler's e with a
# subscript; \gamma (a Lorentz factor) becomes the gamma function. Both sides are renamed alike.
RENAMES = [(re.compile(r"(?<![\\a-zA-Z])E_"), r"\\mathcal{E}_"), (re.compile(r"\\gamma(?![a-zA-Z])"), r"\\mathcal{\\gamma}"),
           (re.compile(r"(?<![a-zA-Z])np\.(?=[a-z]+\()"), r"\\"), (re.compile(r"_\{\\odot\}"), "_{odot}"),
           (re.compile(r"_\{\\(max|min)\s*\}"), r"_{\1}")]
# A plain integer as written in a box once cleaned: optional minus, no leading zeros, no separators, at
# most 100 digits. math-verify reads such a string as that sympy Integer, so two of them are equivalent
# exactly when they are equal (and _tiny_numbers_that_differ never applies: integers are not tiny).
PLAIN_INTEGER = re.compile(r"-?(?:0|[1-9][0-9]{0,99})")


def extract_answer(completion: str) -> str | None:
    """The model's final answer: content of the last \\boxed{} after any thinking, as written."""
    return last_boxed(strip_think(completion))


def clean_answer(text: str) -> str:
    """The answer text math-verify should read: one line, no math delimiters, no trailing
    period, e-notation written as × 10^{n}."""
    text = MATH_DELIMITERS.sub(" ", text)
    text = " ".join(text.split())
    text = text.removesuffix("\\,").rstrip(" .").strip()
    text = E_NOTATION.sub(r"\1 \\times 10^{\2}", text)
    text = TRAILING_POINT.sub(r"\1", text)
    text = TEXT_UNIT.sub("", text).strip() or text
    for pattern, replacement in RENAMES:
        text = pattern.sub(replacement, text)
    return text


def _latex_config():
    from latex2sympy2_extended.latex2sympy2 import NormalizationConfig
    from math_verify import LatexExtractionConfig

    normalization = NormalizationConfig(basic_latex=True, units=False, malformed_operators=True, nits=True,
                                        boxed="all", equations=False)
    return LatexExtractionConfig(normalization_config=normalization)


def parse_answer(text: str) -> list:
    """math-verify's parse of an answer or gold: [sympy object, text], or [] when it cannot parse."""
    return _parse_cleaned(clean_answer(text))


@lru_cache(maxsize=8192)
def _parse_cleaned(cleaned: str) -> list:  # keyed by the cleaned text: `\boxed{ 5 }` and `\boxed{5}` parse once
    from math_verify import parse

    if not cleaned:
        return []
    return parse(f"\\boxed{{{cleaned}}}", extraction_config=[_latex_config()], parsing_timeout=VERIFY_TIMEOUT)


def gold_kind(gold: str) -> dict:
    """Runs in a worker: whether math-verify parses `gold` as math, only as text, or not at all."""
    parsed = parse_answer(gold)
    if not parsed:
        return {"kind": "none"}
    return {"kind": "text" if all(isinstance(p, str) for p in parsed) else "math"}


def gold_kinds(golds: list[str], workers: int) -> dict[str, str]:
    """{gold: "math" | "text" | "none"} for the distinct golds, parsed in worker processes:
    "none" cannot be parsed (every answer would be graded wrong), "text" parses only as text
    (an answer matches it only by the same text: GSM8K's "... #### 2" is such a gold)."""
    distinct = sorted(set(golds))
    with TimeoutPool(gold_kind, workers, HARD_TIMEOUT, on_timeout={"kind": "none"}) as pool:
        return {gold: verdict["kind"] for gold, verdict in zip(distinct, pool.map(distinct))}


def integer_verdict(gold: str, answer: str) -> dict | None:
    """verify_pair's verdict without a worker when both cleaned sides are plain integers (most
    answers of AIME, GSM8K, AMC, half of MATH); None otherwise. tests/test_math_grading.py checks
    it against math-verify."""
    gold_clean, answer_clean = clean_answer(gold), clean_answer(answer)
    if not (PLAIN_INTEGER.fullmatch(gold_clean) and PLAIN_INTEGER.fullmatch(answer_clean)):
        return None
    return {"correct": int(gold_clean) == int(answer_clean), "error": None}


def _warm_up() -> None:
    """Runs in each worker as it starts: math-verify's imports and first parse (about a second) are
    paid then, not by whichever step first meets an answer that is not a plain integer."""
    verify_pair(("1/2", "0.5"))


def verify_pair(pair: tuple[str, str]) -> dict:
    """Runs in a worker: is `answer` equivalent to `gold`? (gold first, as math-verify wants)."""
    from math_verify import verify

    gold, answer = pair
    gold_parsed = parse_answer(gold)
    if not gold_parsed:
        return {"correct": False, "error": f"gold answer not parseable: {gold!r}"}
    answer_parsed = parse_answer(answer)
    correct = bool(verify(gold_parsed, answer_parsed, timeout_seconds=VERIFY_TIMEOUT))
    if correct and _tiny_numbers_that_differ(gold_parsed[0], answer_parsed[0]):
        correct = False
    return {"correct": correct, "error": None}


def _tiny_numbers_that_differ(gold, answer) -> bool:
    """math-verify compares numbers to 6 decimal places (or chops tiny differences to 0), so
    every number below ~1e-6 equals every other: 2.88e-19 "equals" 1.325e-27. Below 1e-3 we ask
    for agreement to 5 significant digits instead, the precision it gives numbers near 1."""
    import sympy

    try:
        gold_value, answer_value = complex(sympy.N(gold, 30)), complex(sympy.N(answer, 30))
    except (TypeError, ValueError, AttributeError):  # not plain numbers (symbols, sets, equations)
        return False
    scale = max(abs(gold_value), abs(answer_value))
    return 0 < scale < 1e-3 and abs(gold_value - answer_value) > 1e-5 * scale


class MathGrader:
    def __init__(self, workers: int = 2):
        self.pool = TimeoutPool(verify_pair, workers, HARD_TIMEOUT, on_timeout={"correct": False, "error": "timeout"},
                                warm_up=_warm_up)
        self.cache: dict[tuple[str, str], dict] = {}

    def grade(self, golds: list[str], completions: list[str]) -> list[dict]:
        """One dict per completion: extracted, correct, error."""
        answers = [extract_answer(c) for c in completions]
        pending = {(g, a) for g, a in zip(golds, answers) if a is not None and (g, a) not in self.cache}
        for pair in pending:
            if (verdict := integer_verdict(*pair)) is not None:
                self.cache[pair] = verdict
        todo = sorted(pair for pair in pending if pair not in self.cache)
        for pair, result in zip(todo, self.pool.map(todo)):
            self.cache[pair] = result
        out = []
        for gold, answer in zip(golds, answers):
            if answer is None:
                out.append({"extracted": None, "correct": False, "error": "no \\boxed{} answer"})
            else:
                out.append({"extracted": answer, **self.cache[(gold, answer)]})
        return out

    def close(self):
        self.pool.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
