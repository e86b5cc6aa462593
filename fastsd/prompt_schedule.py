"""A1111's prompt editing, alternating words and composable prompts: a prompt -> the texts its sampler steps see.

    "a [cat:dog:0.5]"   the first half of the steps "a cat", then "a dog" (prompt editing, [from:to:when])
    "a [cat:4]"         "a " up to step 4, then "a cat"; "a [cat::4]" the other way round
    "a [cat|dog|owl]"   the words in turn, one a step (alternating words); an empty choice is nothing

`when` as A1111 1.7+ reads it (its default, not "Old prompt editing timelines"): a number with a decimal point is a
fraction of the steps, one without is a step count; in the hires fix's second pass a fraction above 1 (1.5 = half
way through it) or a count above the first pass's steps points into that pass, below them the whole pass has the
later text. Brackets of emphasis ("(word:1.2)", "[word]") pass through as text, to be weighed when encoded; a
prompt the syntax can't read (unbalanced brackets in a schedule) is one text, as A1111's. The steps counted are
A1111's: sampler steps, twice the steps for its "second order" samplers (two model calls a step), and the step of a
model call is its index in the pass, from 0 (so `[a:b:3]` gives "a" to the calls 0 to 3).

Composable prompts ("a cat AND a dog :0.6", `split_and`): each part is its own prompt (with its own editing), the
image guided by all of them: uncond + scale * sum of weight * (cond_part - uncond) (fastsd.denoisers).

The syntax is A1111's grammar (modules/prompt_parser.py, GRAMMAR), read by `_Parser` in time linear in the prompt
(lark's Earley parse, A1111's, takes time and memory growing as the cube: 80 x "(a) [b] " took 21 s). Where every
bracket matches, the parse is unique and `_Parser`'s is lark's. Where a bracket or ':' outside brackets is text,
lark's choice of which are text follows no simple rule ("[x:5]((best)):" drops the edit, "[x:5]((best))" keeps it),
so such a prompt, if it edits or alternates, is read by lark as A1111 does, up to MAX_LARK_BRACKETS brackets and
':'; above, a one-line ValueError (match or escape them). A `when` too large for an int (1e400) is the last step.
"""
from __future__ import annotations

import functools
import re
from typing import TypeVar

T = TypeVar("T")

GRAMMAR = r"""
!start: (prompt | /[][():]/+)*
prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*
!emphasized: "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"
scheduled: "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
alternate: "[" prompt ("|" [prompt])+ "]"
WHITESPACE: /\s+/
plain: /([^\\\[\]():|]|\\.)+/
%import common.SIGNED_NUMBER -> NUMBER
"""


AND = re.compile(r"\bAND\b")  # A1111's composable-diffusion separator (upper case, a whole word)
_WEIGHT = re.compile(r"\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+))")  # A1111's re_weight's " :weight", on the stripped end


def split_and(prompt: str) -> list[tuple[str, float]]:
    """A1111's composable prompts (its get_multicond_prompt_list for one prompt): the parts between the words AND,
    each with the weight of a trailing ":number" (1 without one; a prompt without AND has its trailing weight
    read too, as A1111 does), the weight and the whitespace before it taken off the text. (A1111's re_weight,
    whose lazy match takes time quadratic in a run of spaces, read in linear time.)"""
    parts = []
    for sub in AND.split(prompt):
        text, weight = sub.rstrip(), None
        colon = text.rfind(":")
        if colon >= 0 and (m := _WEIGHT.fullmatch(text, colon)):
            text, weight = text[:colon].rstrip(), m.group(1)
        parts.append((text, 1.0 if weight is None else float(weight)))
    return parts


MAX_LARK_BRACKETS = 150  # see _lark_schedule
MAX_DEPTH = 100  # brackets nested deeper than this: the prompt is one text, as one A1111's lark can't read
NUMBER = (r"[+-]?(?:[0-9]+[eE][+-]?[0-9]+|(?:[0-9]+\.(?:[0-9]+)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[0-9]+)")  # lark's
_TEXT = re.compile(r"(?:[^\\\[\]():|]|\\.)+")  # GRAMMAR's plain (whitespace included)
_WHEN = re.compile(r"\s*(" + NUMBER + r")\s*\]")  # ":" [WHITESPACE] NUMBER [WHITESPACE] "]"


class _TooDeep(Exception):
    pass


class _Parser:
    """GRAMMAR read in one pass: inside brackets its parse is unique, and each bracket's parse is made once (memo),
    so the time is linear in the prompt. A parse is a list of items: text, ("s", before, after, when) for
    [before:after:when] (before None without it), ("a", [choice, ...]) for [a|b] (an empty choice None)."""

    def __init__(self, text: str):
        self.s, self.memo = text, {}

    def prompt(self, i: int, depth: int) -> tuple[list, int]:
        """GRAMMAR's prompt from i: its items and where it stops (a bracket, ':' or '|' it can't take)."""
        s, items = self.s, []
        while i < len(s):
            if s[i] in "([":
                got = self.bracket(i, depth + 1)
                if got is None:
                    break
                part, i = got
                items += part
            elif m := _TEXT.match(s, i):
                items.append(m.group())
                i = m.end()
            else:
                break
        return items, i

    def bracket(self, i: int, depth: int) -> tuple[list, int] | None:
        """The emphasis, schedule or alternation opening at i: (its items, the index after it), or None."""
        if i not in self.memo:
            if depth > MAX_DEPTH:
                raise _TooDeep
            self.memo[i] = self._bracket(i, depth)
        return self.memo[i]

    def _bracket(self, i: int, depth: int) -> tuple[list, int] | None:
        s = self.s
        first, j = self.prompt(i + 1, depth)
        c = s[j:j + 1]
        if s[i] == "(":
            if c == ")":
                return ["(", *first, ")"], j + 1
            if c == ":":
                second, k = self.prompt(j + 1, depth)
                if s[k:k + 1] == ")":
                    return ["(", *first, ":", *second, ")"], k + 1
            return None
        if c == "]":
            return ["[", *first, "]"], j + 1
        if c == "|":
            choices = [first]
            while s[j:j + 1] == "|":
                choice, j = self.prompt(j + 1, depth)
                choices.append(choice or None)
            return ([("a", choices)], j + 1) if s[j:j + 1] == "]" else None
        if c == ":":
            if m := _WHEN.match(s, j + 1):
                return [("s", None, first, m.group(1))], m.end()
            second, k = self.prompt(j + 1, depth)
            if s[k:k + 1] == ":" and (m := _WHEN.match(s, k + 1)):
                return [("s", first, second, m.group(1))], m.end()
        return None

    def parse(self) -> tuple[list | None, int]:
        """The whole prompt read from the left, a bracket that can't be read as GRAMMAR's (a lone '(', a ']' too many,
        a ':' outside brackets) as text: (items, the index of the first such bracket or -1); items None if the prompt
        has a '|' outside an alternation or a lone backslash at its end (A1111: unparsable)."""
        s, items, i, loose = self.s, [], 0, -1
        while i < len(s):
            got = self.bracket(i, 1) if s[i] in "([" else None
            if got is not None:
                items += got[0]
                i = got[1]
            elif s[i] in "([)]:":
                loose = i if loose < 0 else loose
                items.append(s[i])
                i += 1
            elif m := _TEXT.match(s, i):
                items.append(m.group())
                i = m.end()
            else:
                return None, loose
        return items, loose


def _nodes(items: list):
    """Every schedule and alternation in a parse, nested ones too (without recursion)."""
    stack = [items]
    while stack:
        for item in stack.pop():
            if isinstance(item, tuple):
                yield item
                parts = item[1:3] if item[0] == "s" else item[1]
                stack.extend(part for part in parts if part)


def _when(text: str, total: int, count_offset: int, fraction_offset: float) -> int:
    """A1111's step of a `when`: min(total, int(v)); a v beyond the last step (1e400, 1.0e308: infinite) is the
    last step (the edit never happens), one below -1 is -1 (it happened before the first step)."""
    v = (float(text) - fraction_offset) * total if "." in text else float(text) - count_offset
    return total if not v < total else int(max(v, -1.0))  # (NaN, from inf * 0 steps: never)


def may_have_schedule(prompt: str) -> bool:
    """Cheap test: only a prompt with '[' can edit or alternate."""
    return "[" in prompt


def prompt_schedule(prompt: str, steps: int, hires_steps: int | None = None) -> list[tuple[int, str]]:
    """[(last step, text), ...] in step order: the text the steps up to `last step` see (A1111's
    get_learned_conditioning_prompt_schedules for one prompt). `steps`: the pass's steps as A1111 counts them (see
    the module doc); `hires_steps`: those of the hires fix's second pass, whose schedule this then is (`steps`
    being the first pass's). Time and memory: linear in the prompt's length (times the entries)."""
    if not may_have_schedule(prompt):
        return [(hires_steps or steps, prompt)]
    try:
        items, loose = _Parser(prompt).parse()
    except _TooDeep:  # brackets nested hundreds deep: kept as text, as an unparsable prompt
        items = None
    if items is None or not any(_nodes(items)):  # (A1111 also keeps a prompt it can't parse as it is)
        return [(hires_steps or steps, prompt)]
    if hires_steps is None:
        count_offset, fraction_offset, total = 0, 0.0, steps
    else:
        count_offset, fraction_offset, total = steps, 1.0, hires_steps
    if loose >= 0:
        return _lark_schedule(prompt, total, count_offset, fraction_offset, loose)
    ends = {total}
    whens = {}
    for node in _nodes(items):
        if node[0] == "s":
            whens[id(node)] = when = _when(node[3], total, count_offset, fraction_offset)
            if when >= 1:
                ends.add(when)
        else:
            ends.update(range(1, total + 1))
    return [(end, _text_at(items, end, whens)) for end in sorted(ends)]


@functools.cache
def _parser():
    import lark

    return lark.Lark(GRAMMAR)


def _lark_schedule(prompt: str, total: int, count_offset: int, fraction_offset: float, loose: int):
    """prompt_schedule of a prompt with both editing or alternation and a bracket or ':' that is text: A1111's
    lark, whose choice among the readings (which brackets are text) no rule short of its Earley parse reproduces,
    at a cost that grows as the cube of the brackets: refused above MAX_LARK_BRACKETS of them."""
    import lark

    if (n := sum(map(prompt.count, "[]():|"))) > MAX_LARK_BRACKETS:
        raise ValueError(f"prompt too complex: {n} brackets and ':' with prompt editing or alternation and an "
                         f"unmatched {prompt[loose]!r} at character {loose}; at most {MAX_LARK_BRACKETS} unless they "
                         "match (escape a literal one: \\( \\) \\[ \\] and a ':' outside brackets: \\:)")
    try:
        tree = _parser().parse(prompt)
    except (lark.exceptions.LarkError, RecursionError):
        return [(total, prompt)]
    ends = {total}
    for node in tree.iter_subtrees():
        if node.data == "scheduled":
            node.children[-2] = when = _when(str(node.children[-2]), total, count_offset, fraction_offset)
            if when >= 1:
                ends.add(when)
        elif node.data == "alternate":
            ends.update(range(1, total + 1))
    try:
        return [(end, _lark_text_at(tree, end)) for end in sorted(ends)]
    except RecursionError:
        return [(total, prompt)]


def _lark_text_at(node, step: int) -> str:
    """The text of a lark parse (sub)tree at `step`, as _text_at."""
    import lark

    if isinstance(node, lark.Token):
        return str(node)
    if node.data == "scheduled":
        before, after, _, when, _ = node.children
        part = before if step <= when else after
        return "" if part is None else _lark_text_at(part, step)
    if node.data == "alternate":
        choice = node.children[(step - 1) % len(node.children)]
        return "" if choice is None else _lark_text_at(choice, step)
    return "".join(_lark_text_at(child, step) for child in node.children if child is not None)


def _text_at(items: list, step: int, whens: dict) -> str:
    """The text of a parse at `step`: a schedule's before-part up to its step, then its after-part; an
    alternation's choice (step - 1) mod count."""
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(item)
        elif item[0] == "s":
            part = item[1] if step <= whens[id(item)] else item[2]
            if part:
                out.append(_text_at(part, step, whens))
        else:
            choice = item[1][(step - 1) % len(item[1])]
            if choice:
                out.append(_text_at(choice, step, whens))
    return "".join(out)


def at_call(schedule: list[tuple[int, T]], call: int) -> T:
    """What the model call `call` (0-based in its pass) sees of a schedule [(last step, value), ...]: the first
    entry whose last step is >= call, else the last (A1111's reconstruct_cond_batch)."""
    return next((value for end, value in schedule if call <= end), schedule[-1][1])
