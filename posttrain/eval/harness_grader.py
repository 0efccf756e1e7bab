"""Harness-style math grading: what the DFT paper's evaluation (the authors' fork of the Qwen2.5-Math
evaluation harness) does, written here from its behaviour, so `posttrain eval --extract harness`
grades as that paper did and `--cross-check` can show where it and math-verify disagree.

Extraction (`harness_extract`), in this order, on the whole completion (the harness does not
remove <think>…</think>):
  1. the last `boxed`: its braces matched (cut by the end of the text: the rest of the text), or for
     `\\boxed 5` the text up to the next `$`;
  2. else the text after the last "the answer is" / "final answer is";
  3. else the last number in the text (thousands commas removed);
  4. else no answer.
Equivalence (`harness_equal`), after normalising both sides (`normalize`: LaTeX spacing,
\\left/\\right, \\dfrac, degrees, %, $, units in a trailing \\text{}, "x =" prefixes, \\frac12 …):
  - equal strings (case-insensitive), or equal after dropping brackets and braces;
  - numbers (integers, decimals, thousands commas, a/b, \\frac{a}{b}): relative tolerance 1e-4, and
    like the harness also the gold × 100 or ÷ 100 (percent answers);
  - tuples and intervals element by element (bracket kinds are not compared, as in the harness);
  - equations a = b against c = d: a − b equals ±(c − d);
  - otherwise a small LaTeX → sympy translation and `simplify(a − b) == 0` or equal numeric values.
Not reproduced: the harness's matrix rules, its long list of word units, multiple-choice letters.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache

from posttrain.eval.pool import TimeoutPool

HARD_TIMEOUT = 10  # seconds per (gold, answer) pair in a worker; sympy can hang on hostile input
REL_TOL = 1e-4  # the harness's numeric tolerance
MAX_SYMBOLIC_CHARS = 120  # longer expressions are not handed to sympy

# --------------------------------------------------------------------------------------------
# Extraction

_NUMBER = re.compile(r"-?\d*\.?\d+")
_ANSWER_PHRASES = ("the answer is", "final answer is")


def harness_extract(completion: str) -> str | None:
    """The harness's answer string of a completion (before normalisation), or None."""
    at = completion.rfind("boxed")
    if at >= 0:
        return _box_content(completion[at + len("boxed"):])
    lowered = completion.lower()
    for phrase in _ANSWER_PHRASES:
        at = lowered.rfind(phrase)
        if at >= 0:
            return completion[at + len(phrase):].strip().lstrip(":").strip() or None
    numbers = _NUMBER.findall(completion.replace(",", ""))
    return numbers[-1] if numbers else None


def _box_content(rest: str) -> str | None:
    if not rest:
        return None
    if rest[0] != "{":  # "\boxed 5$": up to the closing dollar
        return rest.split("$")[0].strip() or None
    depth = 0
    for i, char in enumerate(rest):
        depth += (char == "{") - (char == "}")
        if depth == 0:
            return rest[1:i]
    return rest[1:]  # the box was never closed: the harness keeps what follows


# --------------------------------------------------------------------------------------------
# Normalisation

_SPACING = re.compile(r"\\[!,;: ]|~")
_LEFT_RIGHT = re.compile(r"\\(?:left|right)(?![a-zA-Z])")
_TEXT_LIKE = re.compile(r"\\(?:text|textbf|mathrm|mathbf|textit|mbox)\{([^{}]*)\}")
_TRAILING_UNIT = re.compile(r"^(.+?)\s*\\(?:text|mbox|mathrm)\{\s*[a-zA-Z][a-zA-Z .^{}0-9]*\}$")
_DEGREES = re.compile(r"\^\s*\{?\\circ\}?")
_SHORT_LHS = re.compile(r"^[a-zA-Z]\w?\s*=\s*(?!=)")
_FRAC_SHORT = re.compile(r"\\frac(\d)(\d)")
_SQRT_SHORT = re.compile(r"\\sqrt(\w)")
_TRAILING_ZEROS = re.compile(r"(\d)\.0+(?![\d])")


def normalize(answer: str) -> str:
    s = answer.strip().replace("\n", " ")
    s = s.rstrip(".").strip()
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _LEFT_RIGHT.sub("", s)
    s = _SPACING.sub("", s)
    s = _DEGREES.sub("", s)
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "").replace("$", "")
    unit = _TRAILING_UNIT.match(s)
    if unit:  # "5 \text{ cm}" -> "5"
        s = unit.group(1)
    s = _TEXT_LIKE.sub(r"\1", s)
    s = s.replace("\\{", "{").replace("\\}", "}")
    s = s.replace("\\infty", "∞").replace("infinity", "∞").replace("∞", "\\infty")
    if s.count("=") == 1:
        s = _SHORT_LHS.sub("", s)
    s = s.replace(" ", "")
    s = _FRAC_SHORT.sub(r"\\frac{\1}{\2}", s)
    s = _SQRT_SHORT.sub(r"\\sqrt{\1}", s)
    s = _TRAILING_ZEROS.sub(r"\1", s)
    s = re.sub(r"(^|[^\d])\.(\d)", r"\g<1>0.\2", s)
    if len(s) > 2 and s[0] == "{" and s[-1] == "}" and _matching_close(s, 0) == len(s) - 1:
        s = s[1:-1]
    return s


def _matching_close(text: str, open_at: int) -> int:
    """Index of the bracket closing the one at `open_at` (any of ({[ ), or -1."""
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] in "({[":
            depth += 1
        elif text[i] in ")}]":
            depth -= 1
            if depth == 0:
                return i
    return -1


# --------------------------------------------------------------------------------------------
# Equivalence

_PLAIN_NUMBER = re.compile(r"^-?(\d{1,3}(,\d{3})+|\d+)?(\.\d+)?$")
_FRACTION = re.compile(r"^(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}$|^(-?\d+)/(\d+)$")


def to_number(s: str) -> float | None:
    """A normalised answer that is a plain number or a fraction of integers, as a float."""
    if s and _PLAIN_NUMBER.match(s) and any(c.isdigit() for c in s):
        return float(s.replace(",", ""))
    fraction = _FRACTION.match(s)
    if fraction:
        if fraction.group(2) is not None:
            sign, top, bottom = fraction.group(1), int(fraction.group(2)), int(fraction.group(3))
        else:
            sign, top, bottom = "", int(fraction.group(4)), int(fraction.group(5))
        if bottom == 0:
            return None
        return (-1 if sign else 1) * top / bottom
    return None


def harness_equal(gold: str, answer: str) -> bool:
    """Is `answer` equivalent to `gold` under the harness-style rules (module docstring)?"""
    gold_norm, answer_norm = normalize(gold), normalize(answer)
    if not answer_norm:
        return False
    if gold_norm.lower() == answer_norm.lower():
        return True
    gold_number, answer_number = to_number(gold_norm), to_number(answer_norm)
    if gold_number is not None and answer_number is not None:
        # The harness also accepts the gold as a percentage either way (50 vs 0.5).
        return any(math.isclose(answer_number, g, rel_tol=REL_TOL) for g in (gold_number, gold_number / 100, gold_number * 100))
    if _strip_brackets(gold_norm).lower() == _strip_brackets(answer_norm).lower():
        return True
    gold_parts, answer_parts = _top_level_parts(gold_norm), _top_level_parts(answer_norm)
    if len(gold_parts) > 1 or len(answer_parts) > 1:
        return len(gold_parts) == len(answer_parts) and all(harness_equal(g, a) for g, a in zip(gold_parts, answer_parts))
    if gold_norm.count("=") == 1 and answer_norm.count("=") == 1:
        gold_lhs, gold_rhs = gold_norm.split("=")
        answer_lhs, answer_rhs = answer_norm.split("=")
        gold_diff, answer_diff = f"({gold_lhs})-({gold_rhs})", f"({answer_lhs})-({answer_rhs})"
        return _symbolic_equal(gold_diff, answer_diff) or _symbolic_equal(gold_diff, f"-({answer_diff})")
    return _symbolic_equal(gold_norm, answer_norm)


def _strip_brackets(s: str) -> str:
    return re.sub(r"[(){}\[\]]", "", s)


def _top_level_parts(s: str) -> list[str]:
    """'(1,\\frac{1}{2})' -> ['1', '\\frac{1}{2}']: outer brackets off, split at depth-0 commas."""
    if len(s) > 1 and s[0] in "([" and s[-1] in ")]" and _matching_close(s, 0) == len(s) - 1:
        s = s[1:-1]
    parts, depth, start = [], 0, 0
    for i, char in enumerate(s):
        depth += (char in "({[") - (char in ")}]")
        if char == "," and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    parts.append(s[start:])
    return [p for p in parts if p] if len(parts) > 1 else [s]


def _symbolic_equal(gold: str, answer: str) -> bool:
    gold_expr, answer_expr = _to_sympy(gold), _to_sympy(answer)
    if gold_expr is None or answer_expr is None:
        return False
    import sympy

    try:
        if sympy.simplify(gold_expr - answer_expr) == 0:
            return True
    except Exception:  # sympy raises many types on odd input
        pass
    try:
        gold_value, answer_value = complex(sympy.N(gold_expr)), complex(sympy.N(answer_expr))
        return math.isclose(gold_value.real, answer_value.real, rel_tol=REL_TOL, abs_tol=1e-9) and \
            math.isclose(gold_value.imag, answer_value.imag, rel_tol=REL_TOL, abs_tol=1e-9)
    except Exception:
        return False


_FUNCTIONS = ("sin", "cos", "tan", "cot", "sec", "csc", "arcsin", "arccos", "arctan", "ln", "log", "exp")
_SYMBOLS = {"\\pi": " pi ", "\\cdot": "*", "\\times": "*", "\\div": "/", "\\infty": " oo "}


@lru_cache(maxsize=4096)
def _to_sympy(latex: str):
    """A small LaTeX → sympy translation: \\frac, \\sqrt[n], ^, \\pi, \\cdot, common functions.
    Anything else with a backslash is not translated (None)."""
    if len(latex) > MAX_SYMBOLIC_CHARS:
        return None
    text = _expand_commands(latex)
    if text is None:
        return None
    for name, replacement in _SYMBOLS.items():
        text = text.replace(name, replacement)
    for name in _FUNCTIONS:
        text = text.replace("\\" + name, " " + name)
    if "\\" in text:
        return None  # an untranslated command
    if re.search(r"[a-zA-Z]{2,}", re.sub(r"sqrt|root|pi|oo|arcsin|arccos|arctan|sin|cos|tan|cot|sec|csc|ln|log|exp",
                                         " ", text)):
        return None  # words: implicit multiplication would make "ab" equal "ba" (and "evens" equal "seven")
    text = text.replace("{", "(").replace("}", ")").replace("^", "**")
    import sympy
    from sympy.parsing.sympy_parser import (convert_xor, implicit_multiplication_application, parse_expr,
                                            standard_transformations)

    transformations = standard_transformations + (implicit_multiplication_application, convert_xor)
    try:
        unevaluated = parse_expr(text, transformations=transformations, evaluate=False)
        if not _powers_are_small(unevaluated, sympy):
            return None
        return parse_expr(text, transformations=transformations, evaluate=True)
    except Exception:  # SyntaxError, TokenError, TypeError ... on text that is not an expression
        return None


def _powers_are_small(expr, sympy) -> bool:
    """No power towers and no integer exponent above 1000: evaluating 9^(9^(9^9)) would never end."""
    for node in sympy.preorder_traversal(expr):
        if isinstance(node, sympy.Pow):
            exponent = node.exp
            towers = [p for p in sympy.preorder_traversal(exponent) if isinstance(p, sympy.Pow) and p.exp != -1]
            if towers or (exponent.is_Number and abs(exponent) > 1000):  # (a/b is a * b^-1: allowed)
                return False
    return True


def _expand_commands(text: str) -> str | None:
    """\\frac{a}{b} → ((a)/(b)), \\sqrt{a} → sqrt(a), \\sqrt[n]{a} → root(a,n), recursively."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("\\frac", i):
            first = _braced(text, i + len("\\frac"))
            second = _braced(text, first[1]) if first else None
            if not second:
                return None
            top, bottom = _expand_commands(first[0]), _expand_commands(second[0])
            if top is None or bottom is None:
                return None
            out.append(f"(({top})/({bottom}))")
            i = second[1]
        elif text.startswith("\\sqrt", i):
            i += len("\\sqrt")
            root = "2"
            if i < len(text) and text[i] == "[":
                close = text.find("]", i)
                if close < 0:
                    return None
                root, i = text[i + 1:close], close + 1
            body = _braced(text, i)
            if not body:
                return None
            inner = _expand_commands(body[0])
            if inner is None:
                return None
            out.append(f"sqrt({inner})" if root == "2" else f"root({inner},{root})")
            i = body[1]
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _braced(text: str, at: int) -> tuple[str, int] | None:
    """(content, index after) of the {...} group starting at `at`."""
    if at >= len(text) or text[at] != "{":
        return None
    close = _matching_close(text, at)
    return (text[at + 1:close], close + 1) if close > 0 else None


# --------------------------------------------------------------------------------------------
# The grader (same interface as math_grader.MathGrader)


def harness_verdict(pair: tuple[str, str]) -> dict:
    """Runs in a worker: is the extracted `answer` equivalent to `gold`?"""
    gold, answer = pair
    try:
        return {"correct": bool(harness_equal(gold, answer)), "error": None}
    except Exception as err:  # a bug in a rule must not stop the eval: that pair counts as wrong
        return {"correct": False, "error": f"harness rule failed: {type(err).__name__}: {err}"}


class HarnessGrader:
    """Harness-style extraction and equivalence; identical (gold, answer) pairs are judged once,
    each in a worker process with a hard timeout (the harness gives each pair 3 s)."""

    def __init__(self, workers: int = 2):
        self.pool = TimeoutPool(harness_verdict, workers, HARD_TIMEOUT, on_timeout={"correct": False, "error": "timeout"})
        self.cache: dict[tuple[str, str], dict] = {}

    def grade(self, golds: list[str], completions: list[str]) -> list[dict]:
        answers = [harness_extract(c) for c in completions]
        todo = sorted({(g, a) for g, a in zip(golds, answers) if a is not None and (g, a) not in self.cache})
        for pair, result in zip(todo, self.pool.map(todo)):
            self.cache[pair] = result
        return [{"extracted": None, "correct": False, "error": "no boxed answer, answer phrase or number"} if a is None
                else {"extracted": a, **self.cache[(g, a)]} for g, a in zip(golds, answers)]

    def close(self):
        self.pool.close()
