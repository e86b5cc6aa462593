"""Prompt parsing on hostile input (prompts have no length limit, e.g. in fastsd.serve): edit steps too large for an
int, time linear in the prompt (counted as work done, never as wall-clock time), A1111's results kept (lark running
A1111's grammar as the oracle), clear one-line ValueErrors where a limit is needed, and emphasis' A1111 results."""
import random
import re
import subprocess
import sys

import pytest
import torch

import fastsd.prompt_schedule as ps
from fastsd.prompt_schedule import GRAMMAR, MAX_LARK_BRACKETS, prompt_schedule, split_and
from fastsd.tokenizer import MAX_OPEN_BRACKETS, _split_break, parse_prompt_attention


def lark_schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
    """The reference: A1111's get_learned_conditioning_prompt_schedules for one prompt (lark's Earley parse of its
    grammar), as fastsd ran it before its own parser."""
    import lark

    try:
        tree = lark.Lark(GRAMMAR).parse(prompt)
    except lark.exceptions.LarkError:
        return [(steps, prompt)]
    ends = {steps}
    for node in tree.iter_subtrees():
        if node.data == "scheduled":
            text = str(node.children[-2])
            node.children[-2] = min(steps, int(float(text) * steps if "." in text else float(text)))
            if node.children[-2] >= 1:
                ends.add(node.children[-2])
        elif node.data == "alternate":
            ends.update(range(1, steps + 1))
    return [(end, ps._lark_text_at(tree, end)) for end in sorted(ends)]


@pytest.mark.parametrize("prompt,want", [
    ("[a:b:1e400]", [(10, "a")]), ("[a:b:1.0e308]", [(10, "a")]), ("[a:b:99999999999999999999999]", [(10, "a")]),
    ("[a:b:-1e400]", [(10, "b")]), ("[a:b:-1.0e308]", [(10, "b")]), ("x [a::1e400]", [(10, "x a")]),
    (": [a:b:1e400]", [(10, ": a")]),  # (a bracket that is text: read by lark)
])
def test_edit_step_beyond_any_int(prompt, want):
    """A `when` float() reads as inf (or whose fraction of the steps is): A1111's min(steps, int(when)) is the last
    step, the edit never happens (below -1: it happened before the first step); was OverflowError."""
    assert prompt_schedule(prompt, 10) == want
    assert prompt_schedule(prompt, 10, 10) == want  # the hires pass's offsets


TOKENS = ["cat", "a dog", ", ", " ", "(best:1.2)", "((best))", "[x:y:0.5]", "[x:5]", "[x::0.3]", "[a|b]", "[fe||]",
          "(", ")", "[", "]", ":", "::", "))", "]]", "[[", "\\(", "\\", "|", "(a [b:c:2] d)", "[[a:b:1]:c:2]",
          "[a: 3 ]", "1e5]"]


def test_schedules_are_a1111s_lark_parse():
    """Random prompts of A1111's syntax and stray brackets: the same schedules as lark's parse of A1111's grammar
    (well-formed ones by fastsd's own parser, those with a bracket that is text by lark)."""
    rng = random.Random(1)
    for _ in range(400):
        p = "".join(rng.choice(TOKENS) for _ in range(rng.randint(1, 7)))
        assert prompt_schedule(p, 4) == lark_schedule(p, 4), p


@pytest.fixture
def counted(monkeypatch):
    """Counts the brackets parsed; lark must not run."""
    calls = []
    bracket = ps._Parser._bracket
    monkeypatch.setattr(ps._Parser, "_bracket", lambda self, i, depth: calls.append(i) or bracket(self, i, depth))
    monkeypatch.setattr(ps, "_parser", lambda: pytest.fail("lark ran"))
    return calls


@pytest.mark.parametrize("unit,n_brackets", [("[a|b] ", 1), ("(a) [b] ", 2), ("[a:b:0.5] (c:1.2) ", 2),
                                             ("[[a|(b:1.1)]:[c::3]:0.4] ", 4)])
def test_parse_work_is_linear(counted, unit, n_brackets):
    """80 x "(a) [b] " took lark 21 s and "[a|b] " x 500 more than 14 min: now each bracket is parsed once."""
    one = prompt_schedule(unit, 20)
    for n in (10, 2000):
        counted.clear()
        assert prompt_schedule(unit * n, 20) == [(end, text * n) for end, text in one]
        assert len(counted) == n_brackets * n


def test_deep_and_pathological_brackets(counted):
    deep = "[" * 5000 + "a:1" + "]" * 5000  # deeper than MAX_DEPTH: one text (lark: RecursionError), as before
    assert prompt_schedule(deep, 10) == [(10, deep)] and len(counted) <= ps.MAX_DEPTH + 1
    for p in ["[" * 20000, "[a" * 10000 + "|" * 10000, "(" * 20000 + "[a:1]", "[a|" * 5000 + "]" * 5000]:
        counted.clear()
        prompt_schedule(p, 10)
        assert len(counted) <= 2 * len(p)


def test_stray_brackets_with_edits_are_read_by_lark_up_to_a_limit():
    """Which brackets A1111's lark reads as text when some don't match follows no rule short of its Earley parse
    ("[x:5]((best)):" drops the edit, "[x:5]((best))" keeps it), whose time grows as the cube: lark below
    MAX_LARK_BRACKETS brackets, a one-line ValueError above."""
    assert prompt_schedule("[x:5]((best)):", 10) == [(10, "[x:5]((best)):")] == lark_schedule("[x:5]((best)):", 10)
    assert prompt_schedule("[x:5]((best))", 10) == [(5, "((best))"), (10, "x((best))")]
    for p in ["(a) [b] " * 10 + ": [x:1]", ": [x:1] " + "\\(" * (MAX_LARK_BRACKETS - 4)]:  # (escaped: cheap for lark)
        assert prompt_schedule(p, 4) == lark_schedule(p, 4)
    with pytest.raises(ValueError, match="prompt too complex"):
        prompt_schedule(": [x:1] " + "\\(" * (MAX_LARK_BRACKETS - 3), 4)
    with pytest.raises(ValueError, match=r"^prompt too complex: .* unmatched ':' at character \d+; .*\\\(") as e:
        prompt_schedule("(a) [b] " * 80 + ": [x:1]", 20)
    assert "\n" not in str(e.value)
    long_ok = "(a) [b] " * 5000 + "[x:1]"  # brackets that match: any length
    assert prompt_schedule(long_ok, 4)[0] == (1, "(a) [b] " * 5000)
    assert prompt_schedule(": (a) [b] " * 5000, 4) == [(4, ": (a) [b] " * 5000)]  # nothing to edit: one text


WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")  # A1111's re_weight
BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)  # A1111's re_break


def test_split_and_and_break_are_a1111s_regexes():
    rng = random.Random(2)
    alphabet = [" ", ":", "1", ".", "-", "a", "\n", "\u00a0", "\x1c", "AND", " AND ", "\u0663", "x:1", ": 2 ", "BREAK",
                "BREAKx", "_BREAK", "é", "(", ")"]
    for _ in range(20000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 10)))
        want = [(t, 1.0 if w is None else float(w)) for t, w in (WEIGHT.search(x).groups() for x in re.split(
            r"\bAND\b", s))]
        assert split_and(s) == want, s
        assert _split_break(s) == BREAK.split(s), s


def test_long_space_runs_smoke():
    """Smoke (a generous timeout, not a timing): A1111's regexes took time quadratic in a run of spaces
    (20,000 spaces: split_and 2 s, parse_prompt_attention 5.6 s; 400,000 would take hours)."""
    code = ("from fastsd.prompt_schedule import split_and; from fastsd.tokenizer import parse_prompt_attention as p; "
            "s = 'a' + ' ' * 400000 + 'b :1'; assert split_and(s) == [(s[:-3], 1.0)]; "
            "assert p(s) == [(s, 1.0)]; "
            "assert p('x' + ' ' * 400000 + 'BREAK y') == [('x', 1.0), ('BREAK', -1.0), ('y', 1.0)]")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


@pytest.mark.parametrize("text,want", [  # A1111's parse_prompt_attention gives these
    ("[a:b", [("a:b", 1 / 1.1)]), ("[:]", [(":", 1 / 1.1)]), ("[a|", [("a|", 1 / 1.1)]),
    ("(a:nan)", [("a:nan", 1.1)]), ("(a:1e400)", [("a:1e400", 1.1)]), ("(a:inf)", [("a:inf", 1.1)]),
    ("(a:0)", [("a", 0.0)]), ("(a:1.5", [("a:1.5", 1.1)]),
])
def test_emphasis_of_unterminated_brackets_and_odd_numbers_is_a1111s(text, want):
    assert parse_prompt_attention(text) == want


@pytest.mark.parametrize("text", ["(a:" + "9" * 400 + ")", "((a:" + "9" * 300 + "):" + "9" * 300 + ")"],
                         ids=["9e400", "9e300 x 9e300"])
def test_non_finite_weight_is_one_line_value_error(text):
    with pytest.raises(ValueError, match=r"^prompt: the emphasis weight of 'a' is not a finite number \(inf\)") as e:
        parse_prompt_attention(text)
    assert "\n" not in str(e.value)


def test_open_bracket_limit():
    """Each piece is weighed once per bracket open over it (A1111's loop): time pieces x open brackets, so more than
    MAX_OPEN_BRACKETS open at once are refused ("(a" x 50,000 took minutes)."""
    assert parse_prompt_attention("(a" * MAX_OPEN_BRACKETS)[-1] == ("a", pytest.approx(1.1 ** MAX_OPEN_BRACKETS))
    assert len(parse_prompt_attention("(a)" * 50000)) == 1  # closed ones: any number
    with pytest.raises(ValueError, match=rf"^prompt: more than {MAX_OPEN_BRACKETS} emphasis brackets open at once"):
        parse_prompt_attention("(a" * 50000)


def test_mean_restore_of_an_encoder_averaging_zero():
    """random:tiny's hidden states average 0 (its LayerNorm): A1111's restore mean / weighted mean divided by 0 (inf,
    NaN: "emphasis weights overflow", a misleading message for [a:b) or wiped the chunk out; such a chunk is
    left as weighted. A chunk with a real mean gets A1111's factor."""
    from fastsd import load_pipeline
    from fastsd.conditioning import _mean_ratio, encode_prompts

    pipe = load_pipeline("random:tiny", device="cpu", dtype="fp32", backend="torch")
    for text in ["[a:b", "[:]", "[a|", "(a:nan)", "(a)"]:
        ctx = encode_prompts(pipe.clip, pipe.tokenizer, [text])
        assert torch.isfinite(ctx).all() and ctx.abs().mean() > 0.1, text
    mean, new, size = torch.tensor([-0.1, 1e-9, 0.2]), torch.tensor([-0.2, 0.3, 0.0]), torch.tensor([1.0, 1.0, 1.0])
    assert _mean_ratio(mean, new, size).tolist() == [(mean[0] / new[0]).item(), 1.0, 1.0]
