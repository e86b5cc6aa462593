"""fastsd.tokenizer: shipped CLIP vocab, parity with transformers, chunking, A1111 emphasis."""

from __future__ import annotations

import json
import os
import shutil
from functools import lru_cache
from importlib.resources import files

import pytest
import torch
from transformers import CLIPTokenizer

from fastsd import CheckpointError
from fastsd.tokenizer import BOS, EOS, MAX_LENGTH, Tokenizer, parse_prompt_attention

ASSETS = files("fastsd") / "assets"

WORDS_200 = " ".join(f"word{i % 10} apple" if i % 2 else "cat" for i in range(200))

PROMPTS = [
    "a photo of a cat",
    "A Photo Of A CAT",
    "café naïve résumé Zürich façade",  # accents
    "cafe\u0301 (decomposed accent)",  # NFC normalisation
    "東京タワーの夜景, 北京烤鸭",  # CJK
    "a cat 🐱 on fire 🔥🔥, 👩‍🚀 astronaut",  # emoji incl. ZWJ sequence
    "Hello, world!!! ... (test) [x] {y} <z> #tag @user $5 100% a&b ~ ^_^ -- \\ /",
    "1234567 3.14159 1e10 2024-01-01 0x1F 4k 8K UHD",
    "a   photo\n\nof\ta    cat  \r\n",  # repeated spaces, newlines, tabs
    "it's don't we're I'll they've she'd I'm",
    "masterpiece, best quality, (ultra-detailed:1.2), [blurry]",
    "a photo <|endoftext|> of a cat",
    WORDS_200,
    "",
    "   ",
]


@lru_cache(maxsize=1)
def tok() -> Tokenizer:
    return Tokenizer()


@lru_cache(maxsize=1)
def hf() -> CLIPTokenizer:
    # Built from the same shipped files; positional because the keyword names differ between
    # transformers 4 (vocab_file/merges_file) and 5 (vocab/merges).
    return CLIPTokenizer(str(ASSETS / "vocab.json"), str(ASSETS / "merges.txt"))


@lru_cache(maxsize=1)
def vocab() -> dict[str, int]:
    return json.loads((ASSETS / "vocab.json").read_text(encoding="utf-8"))


# --- shipped files -----------------------------------------------------------------------------


def test_vocab_json_layout():
    v = vocab()
    assert len(v) == 49408 and sorted(v.values()) == list(range(49408))
    assert v["!"] == 0 and v["!</w>"] == 256  # 256 byte chars, then the same + '</w>'
    assert v["a</w>"] == 320 and v["photo</w>"] == 1125 and v["cat</w>"] == 2368
    assert v["of</w>"] == 539 and v[",</w>"] == 267
    assert v["<|startoftext|>"] == BOS == 49406 and v["<|endoftext|>"] == EOS == 49407


def test_merges_txt_layout():
    lines = (ASSETS / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2"
    merges = lines[1:]
    assert len(merges) == 48894 and merges[0] == "i n" and merges[1] == "t h"
    v = vocab()
    # merge k (0-based) produces vocab id 512 + k
    for k in (0, 1, 1000, 48893):
        assert v["".join(merges[k].split(" "))] == 512 + k


def test_licence_file_shipped():
    text = (ASSETS / "LICENSE-CLIP-VOCAB.txt").read_text(encoding="utf-8")
    assert "MIT" in text and "OpenAI" in text and "derive_clip_vocab.py" in text


# --- ids --------------------------------------------------------------------------------------


def test_known_prompt():
    assert tok().encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    assert tok()(["a photo of a cat"])[0, :8].tolist() == [BOS, 320, 1125, 539, 320, 2368, EOS, EOS]


@pytest.mark.parametrize("text", PROMPTS)
def test_encode_matches_transformers(text: str):
    assert tok().encode(text) == hf()(text, add_special_tokens=False)["input_ids"]


def test_call_matches_transformers_sd1_padding():
    ours = tok()(PROMPTS)
    ref = hf()(PROMPTS, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
    assert ours.dtype == torch.long and ours.shape == (len(PROMPTS), MAX_LENGTH)
    assert torch.equal(ours, ref["input_ids"])


def test_call_accepts_single_string_and_truncates():
    out = tok()(WORDS_200)
    assert out.shape == (1, MAX_LENGTH)
    assert out[0, 0] == BOS and out[0, -1] == EOS
    assert out[0, 1:76].tolist() == tok().encode(WORDS_200)[:75]


def _bpe_reference(text: str) -> list[int]:
    """Independent pure-python CLIP BPE (after OpenAI's simple_tokenizer.py) over the shipped
    files, with the normalisation transformers applies (NFC, collapse whitespace, lowercase)
    in place of ftfy/html.unescape."""
    regex = pytest.importorskip("regex")
    import unicodedata

    v = vocab()
    merges = (ASSETS / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    ranks = {tuple(m.split(" ")): i for i, m in enumerate(merges)}
    byte_chars = list(v)[:256]  # vocab order starts with the byte-level alphabet
    byte_order = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    byte_order += list(range(ord("®"), ord("ÿ") + 1))
    byte_order += [b for b in range(256) if b not in byte_order]
    byte_enc = dict(zip(byte_order, byte_chars))
    pat = regex.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        regex.IGNORECASE,
    )
    text = regex.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip().lower()
    ids: list[int] = []
    for piece in pat.findall(text):
        if piece in ("<|startoftext|>", "<|endoftext|>"):
            ids.append(v[piece])
            continue
        word = [byte_enc[b] for b in piece.encode("utf-8")]
        word[-1] += "</w>"
        while len(word) > 1:
            pairs = [(word[i], word[i + 1]) for i in range(len(word) - 1)]
            best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids += [v[w] for w in word]
    return ids


@pytest.mark.parametrize("text", PROMPTS)
def test_encode_matches_pure_python_bpe(text: str):
    assert tok().encode(text) == _bpe_reference(text)


FUZZ_PIECES = ["a", "cat", "Photo", " ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\u200b", "\u2028", "'s", "'T",
               "\u2019s", "don't", "I'LL", "1", "23", "\u00b2", "\u00bd", "\u216b", "\u0663", "\u00e9", "e\u0301", "\u00df",
               "\u0130", "\u01c5", "\u03a3", "\u03c2", "\u6771\u4eac", "\u30fc", "\U0001f431", "\U0001f469\u200d\U0001f680",
               "\U0001f1eb\U0001f1f7", "!", "...", "(", ")", "[", "]", "<", ">", "|", "<|endoftext|>", "<|ENDOFTEXT|>",
               "<|startoftext|>", "<|endoftext", "|>", "\\", "_", "-", "~", "\x00", "\x07", "\ufeff", "\ufb01", "\u00c5",
               "\u2126", "\u0300", "\u05d0", "\u0627\u0644", "x\u00b2", "\uff46\uff55\uff4c\uff4c", "\u2460", "\u221e",
               "\u2122", "\u00a9", "\U0001d400", "#", "@", "$"]


def test_encode_matches_transformers_on_random_strings():
    """3000 seeded random strings from pieces that stress normalisation and the split rule (Unicode whitespace,
    digits of every kind, combining marks, case folding, emoji sequences, special-token look-alikes in any case):
    the ids of transformers' CLIPTokenizer over the same files."""
    import random

    rng = random.Random(0)
    texts = ["".join(rng.choice(FUZZ_PIECES) for _ in range(rng.randint(0, 12))) for _ in range(3000)]
    ours = tok().encode_batch(texts)
    theirs = hf()(texts, add_special_tokens=False)["input_ids"]
    assert [t for t, a, b in zip(texts, ours, theirs) if a != b] == []


def test_generating_imports_no_transformers():
    """transformers is the tests' oracle only: a CLI run of fastsd (import, tokenize, generate) never imports it."""
    import subprocess
    import sys

    code = ("import sys, fastsd\n"
            "p = fastsd.load_pipeline('random:tiny', device='cpu')\n"
            "p.generate('a cat (red:1.2)', steps=1, width=64, height=64, progress=False)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'diffusers')))")
    r = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_loads_from_directory(tmp_path):
    # e.g. a diffusers snapshot's tokenizer/ folder
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(str(ASSETS / name), tmp_path / name)
    t = Tokenizer(tmp_path)
    assert t.encode(PROMPTS[5]) == tok().encode(PROMPTS[5])
    with pytest.raises(CheckpointError, match=r"missing.vocab\.json: no such file or folder"):
        Tokenizer(tmp_path / "missing")


@pytest.mark.parametrize("name,content,want", [
    ("vocab.json", b"{not json", "vocab.json: not valid JSON"),
    ("vocab.json", b"\xff\xfe\x00", "vocab.json: not a UTF-8 text file"),
    ("vocab.json", b'{"a": "b"}', "vocab.json: not a CLIP vocabulary (expected a JSON object of token -> id, got ids"),
    ("vocab.json", b'{"a": 0, "<|endoftext|>": 1}', "vocab.json: not the SD1 CLIP vocabulary (2 tokens"),
    ("merges.txt", b"#version: 0.2\n", "merges.txt: no merges"),
    ("merges.txt", b"\xff\xfe\x00\x01 zz\n", "merges.txt: not a UTF-8 text file"),
])
def test_bad_tokenizer_files_are_one_line_errors_naming_the_file(tmp_path, name, content, want):
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(str(ASSETS / f), tmp_path / f)
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        Tokenizer(tmp_path)
    assert str(e.value).startswith(str(tmp_path / name) + ": ") and want in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_tokenizer_file_that_is_a_fifo_is_refused_unopened(tmp_path):
    shutil.copy(str(ASSETS / "vocab.json"), tmp_path / "vocab.json")
    os.mkfifo(tmp_path / "merges.txt")  # opening it would block
    with pytest.raises(CheckpointError, match=r"merges\.txt: not a regular file \(a FIFO\)"):
        Tokenizer(tmp_path)


# --- 75-token chunks ----------------------------------------------------------------------------


def _check_chunk_rows(rows: torch.Tensor, ids: list[int]) -> None:
    n = max(1, -(-len(ids) // 75))
    assert rows.shape == (n, MAX_LENGTH) and rows.dtype == torch.long
    assert (rows[:, 0] == BOS).all()
    for c in range(n):
        part = ids[75 * c : 75 * (c + 1)]
        assert rows[c, 1 : 1 + len(part)].tolist() == part
        assert (rows[c, 1 + len(part) :] == EOS).all()  # EOS then EOS padding


def test_chunks_long_prompt():
    ids = tok().encode(WORDS_200)
    assert len(ids) == 400  # "cat" / "word<d> apple" -> 1 / 3 tokens
    rows = tok().chunks(ids)
    assert rows.shape[0] == 6
    _check_chunk_rows(rows, ids)
    assert rows[-1, 1 + 25] == EOS and rows[-1, 25] != EOS  # last chunk: 25 tokens then EOS


@pytest.mark.parametrize("n", [0, 1, 74, 75, 76, 150, 151])
def test_chunks_boundaries(n: int):
    ids = [320] * n
    _check_chunk_rows(tok().chunks(ids), ids)


def test_chunks_empty_prompt():
    rows = tok().chunks(tok().encode(""))
    assert rows.tolist() == [[BOS] + [EOS] * 76]
    assert torch.equal(rows, tok()([""]))


# --- A1111 emphasis -----------------------------------------------------------------------------

A1111_EXAMPLES = [  # the examples from A1111's parse_prompt_attention docstring
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
]


@pytest.mark.parametrize("text, expected", A1111_EXAMPLES)
def test_parse_a1111_examples(text, expected):
    assert parse_prompt_attention(text) == expected  # exact floats, as A1111 computes them


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", [("", 1.0)]),
        ("[a]", [("a", 1 / 1.1)]),
        ("[[a]]", [("a", 1 / 1.1 / 1.1)]),
        ("(a:0.5) b", [("a", 0.5), (" b", 1.0)]),
        ("(a : 1.5 )", [("a ", 1.5)]),  # spaces around the number
        ("((a:1.5))", [("a", 1.5 * 1.1)]),
        ("[(a:1.5)]", [("a", 1.5 / 1.1)]),
        ("(a:b)", [("a:b", 1.1)]),  # ':' not followed by a number is text
        ("[a:1.5]", [("a:1.5", 1 / 1.1)]),  # explicit weights only close round brackets
        ("a:1.5) b]", [("a:1.5) b]", 1.0)]),  # unmatched closers are text
        ("a) (b", [("a) ", 1.0), ("b", 1.1)]),
        ("([a)]", [("a", 1.1 / 1.1)]),  # '(' and '[' are tracked independently
        ("(a:1.2.3)", [("a:1.2.3)", 1.1)]),  # malformed number: text (A1111 raises)
        ("\\\\ \\( \\)", [("\\ ( )", 1.0)]),
        ("a\\b", [("ab", 1.0)]),  # a lone backslash is dropped
        ("(a) (b)", [("a", 1.1), (" ", 1.0), ("b", 1.1)]),
    ],
)
def test_parse_rules(text, expected):
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("a\nBREAK\nb", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("BREAK", [("", 1.0), ("BREAK", -1.0), ("", 1.0)]),
        ("a BREAK BREAK b", [("a", 1.0), ("BREAK", -1.0), ("", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("a BREAKfast", [("a BREAKfast", 1.0)]),  # whole word only
        ("a break b", [("a break b", 1.0)]),  # upper case only
        ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.0), ("b", 1.1)]),  # deviation: still breaks
    ],
)
def test_parse_break(text, expected):
    assert parse_prompt_attention(text) == expected


# --- weighted chunks ----------------------------------------------------------------------------


def test_encode_weighted_plain_prompt_matches_chunks():
    for text in ("a photo of a cat", "", WORDS_200):
        ids, weights = tok().encode_weighted(text)
        assert torch.equal(ids, tok().chunks(tok().encode(text)))
        assert weights.dtype == torch.float32 and torch.equal(weights, torch.ones(ids.shape))


def test_encode_weighted_weights():
    ids, weights = tok().encode_weighted("a (photo:1.3) of [a cat]")
    assert ids.shape == weights.shape == (1, MAX_LENGTH)
    assert ids[0, :7].tolist() == [BOS, 320, 1125, 539, 320, 2368, EOS]
    w = torch.tensor([1.0, 1.0, 1.3, 1.0, 1 / 1.1, 1 / 1.1, 1.0], dtype=torch.float32)
    assert torch.equal(weights[0, :7], w)
    assert (weights[0, 7:] == 1.0).all() and (ids[0, 7:] == EOS).all()


def test_encode_weighted_escaped_parens_are_tokens():
    ids, weights = tok().encode_weighted("\\(cat\\)")
    assert ids[0, 1:4].tolist() == tok().encode("(cat)")
    assert (weights == 1.0).all()


def test_encode_weighted_break_pads_chunk():
    ids, weights = tok().encode_weighted("a (cat:1.5) BREAK a dog")
    assert ids.shape == (2, MAX_LENGTH)
    assert ids[0].tolist() == [BOS, 320, 2368, EOS] + [EOS] * 73
    assert ids[1, :4].tolist() == [BOS, 320, tok().encode("dog")[0], EOS]
    assert weights[0, :4].tolist() == [1.0, 1.0, 1.5, 1.0] and (weights[1] == 1.0).all()


@pytest.mark.parametrize(
    "text, n_chunks",
    [("BREAK", 1), ("a BREAK", 1), ("BREAK a", 2), ("a BREAK BREAK b", 3), ("a BREAK b BREAK c", 3)],
)
def test_encode_weighted_break_chunk_counts(text, n_chunks):
    ids, _ = tok().encode_weighted(text)
    assert ids.shape == (n_chunks, MAX_LENGTH)
    assert (ids[:, 0] == BOS).all() and (ids[:, -1] == EOS).all()


def test_encode_weighted_long_prompt_with_break():
    ids, _ = tok().encode_weighted(WORDS_200 + " BREAK cat")
    assert ids.shape == (7, MAX_LENGTH)  # 400 tokens -> 6 chunks, BREAK closes the 6th
    assert ids[6, :3].tolist() == [BOS, 2368, EOS]
    exact, _ = tok().encode_weighted(" ".join(["cat"] * 75) + " BREAK dog")
    assert exact.shape == (2, MAX_LENGTH)  # a full chunk followed by BREAK adds no empty chunk


def test_encode_weighted_comma_backtrack():
    text = " ".join(["cat"] * 70) + ", " + " ".join(["dog"] * 10)  # comma is token 71
    plain, _ = tok().encode_weighted(text)
    assert plain[0, 1:76].tolist() == [2368] * 70 + [267] + [tok().encode("dog")[0]] * 4
    ids, weights = tok().encode_weighted(text, comma_backtrack=20)
    dog = tok().encode("dog")[0]
    assert ids.shape == (2, MAX_LENGTH)
    assert ids[0, 1:73].tolist() == [2368] * 70 + [267, EOS]  # cut after the comma, padded
    assert ids[1, :12].tolist() == [BOS] + [dog] * 10 + [EOS]
    assert weights.shape == ids.shape
    far, _ = tok().encode_weighted(text, comma_backtrack=3)  # comma too far back: no cut
    assert torch.equal(far, plain)
