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

The syntax is A1111's grammar (modules/prompt_parser.py) written for lark, whose Earley parser resolves it as
A1111's does.
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
WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")  # "text :weight"


def split_and(prompt: str) -> list[tuple[str, float]]:
    """A1111's composable prompts (its get_multicond_prompt_list for one prompt): the parts between the words AND,
    each with the weight of a trailing ":number" (1 without one; a prompt without AND has its trailing weight
    read too, as A1111 does), the weight and the whitespace before it taken off the text."""
    parts = []
    for sub in AND.split(prompt):
        text, weight = WEIGHT.search(sub).groups()
        parts.append((text, 1.0 if weight is None else float(weight)))
    return parts


@functools.cache
def _parser():
    import lark

    return lark.Lark(GRAMMAR)


def may_have_schedule(prompt: str) -> bool:
    """Cheap test: only a prompt with '[' can edit or alternate."""
    return "[" in prompt


def prompt_schedule(prompt: str, steps: int, hires_steps: int | None = None) -> list[tuple[int, str]]:
    """[(last step, text), ...] in step order: the text the steps up to `last step` see (A1111's
    get_learned_conditioning_prompt_schedules for one prompt). `steps`: the pass's steps as A1111 counts them (see
    the module doc); `hires_steps`: those of the hires fix's second pass, whose schedule this then is (`steps`
    being the first pass's)."""
    if not may_have_schedule(prompt):
        return [(hires_steps or steps, prompt)]
    import lark

    try:
        tree = _parser().parse(prompt)
    except (lark.exceptions.LarkError, RecursionError):  # (A1111 also keeps a prompt it can't parse as it is)
        return [(hires_steps or steps, prompt)]
    if hires_steps is None:
        count_offset, fraction_offset, total = 0, 0.0, steps
    else:
        count_offset, fraction_offset, total = steps, 1.0, hires_steps
    ends = {total}
    for node in tree.iter_subtrees():
        if node.data == "scheduled":
            text = str(node.children[-2])
            v = (float(text) - fraction_offset) * total if "." in text else float(text) - count_offset
            node.children[-2] = min(total, int(v))
            if node.children[-2] >= 1:
                ends.add(node.children[-2])
        elif node.data == "alternate":
            ends.update(range(1, total + 1))
    try:
        return [(end, _text_at(tree, end)) for end in sorted(ends)]
    except RecursionError:  # brackets nested hundreds deep: kept as text, as an unparsable prompt
        return [(hires_steps or steps, prompt)]


def _text_at(node, step: int) -> str:
    """The text of a parse (sub)tree at `step`: a schedule's before-part up to its step, then its after-part; an
    alternation's choice (step - 1) mod count."""
    import lark

    if isinstance(node, lark.Token):
        return str(node)
    if node.data == "scheduled":
        before, after, _, when, _ = node.children
        part = before if step <= when else after
        return "" if part is None else _text_at(part, step)
    if node.data == "alternate":
        choice = node.children[(step - 1) % len(node.children)]
        return "" if choice is None else _text_at(choice, step)
    return "".join(_text_at(child, step) for child in node.children if child is not None)


def at_call(schedule: list[tuple[int, T]], call: int) -> T:
    """What the model call `call` (0-based in its pass) sees of a schedule [(last step, value), ...]: the first
    entry whose last step is >= call, else the last (A1111's reconstruct_cond_batch)."""
    return next((value for end, value in schedule if call <= end), schedule[-1][1])
