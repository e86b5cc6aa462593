"""CLIP tokenizer for Stable Diffusion 1.x, plus AUTOMATIC1111-style prompt emphasis.

The BPE vocabulary ships inside the package (``fastsd/assets/vocab.json`` and ``merges.txt``,
derived from OpenAI CLIP's ``bpe_simple_vocab_16e6.txt.gz`` by ``tools/derive_clip_vocab.py``),
so nothing is ever downloaded. Tokenization runs on Hugging Face's ``tokenizers`` library (a byte-level BPE
with CLIP's normalisation and split rule, the pipeline transformers' CLIPTokenizer builds); transformers itself
is only the tests' oracle (README "Tokenizer vocabulary" has what importing it cost).

Prompt emphasis follows A1111's ``modules/prompt_parser.py`` (``parse_prompt_attention``):

* ``(text)`` multiplies the weight of ``text`` by 1.1, ``[text]`` divides it by 1.1.
* ``(text:1.3)`` multiplies by the explicit number (spaces allowed around the number).
* Nesting multiplies: ``((text))`` is 1.1 * 1.1. Multipliers are applied when a bracket closes,
  innermost first, so floats match A1111 bit for bit (e.g. ``(((house:1.3)))`` is 1.573...04).
* ``\\(``, ``\\)``, ``\\[``, ``\\]``, ``\\\\`` are literal characters; any other backslash is dropped.
* A closing bracket with no matching opener, a ``:`` not followed by ``number)``, and
  ``:number)`` with no open ``(`` are plain text. (A1111 raises on a malformed number such as
  ``(a:1.2.3)``; here that ``:1.2.3)`` is plain text.) Brackets still open at the end of the prompt
  apply their multiplier to everything after them. ``(`` and ``[`` are matched independently.
* ``BREAK`` (a whole word, upper case) ends the current 75-token chunk; it is represented as
  ``("BREAK", -1.0)``.
* Adjacent pieces with equal weight are merged; an empty prompt gives ``[("", 1.0)]``.

Deliberate deviation: in A1111 a ``BREAK`` inside brackets gets its marker weight multiplied
(e.g. -1.1) and is then tokenized as the literal word "BREAK"; here a ``BREAK`` always breaks,
and BREAK markers are never re-weighted or merged. Limits A1111 lacks (one-line ValueError): a weight that
is not finite (``(a:9...9)`` with 400 digits is inf; A1111's image would be NaN), and more than
``MAX_OPEN_BRACKETS`` brackets open at once (each piece is weighed once per open bracket: time pieces x brackets).

Long prompts (A1111 rule): token ids are cut into chunks of 75; each chunk becomes
``BOS + chunk + EOS`` padded with EOS to 77 tokens (pad = EOS for SD1). An empty prompt still
gives one chunk. BOS, EOS and padding have weight 1.0.
"""

from __future__ import annotations

import json
import math
import os
import re
from importlib.resources import as_file, files
from pathlib import Path

import torch
from tokenizers import Regex, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _BPETokenizer
from tokenizers.models import BPE

from fastsd.tensorfile import CheckpointError, check_regular_file

BOS = 49406  # <|startoftext|>
EOS = 49407  # <|endoftext|>
PAD = EOS  # SD1 pads with <|endoftext|>
MAX_LENGTH = 77
CHUNK_LENGTH = MAX_LENGTH - 2  # 75 content tokens between BOS and EOS
VOCAB_SIZE = 49408

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
BREAK = ("BREAK", -1.0)

# CLIP's rule: the special tokens, English contractions, letter runs, single digits, other symbol runs
_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

# One alternative per A1111 token kind: escapes, a lone backslash, openers, ":weight)",
# closers, a run of plain text, a lone ':'.
_ATTENTION_RE = re.compile(
    r"""
    \\[()\[\]\\]             # escaped bracket or backslash
    | \\                     # any other backslash (dropped)
    | [(\[]                  # opening bracket
    | :\s*([+-]?[.\d]+)\s*\) # explicit weight closing a round bracket
    | [)\]]                  # closing bracket
    | [^\\()\[\]:]+          # plain text
    | :                      # a colon that is not a weight
    """,
    re.X,
)
_BREAK_WORD = re.compile(r"\bBREAK\b")
_SPACES = re.compile(r"\s*")
MAX_OPEN_BRACKETS = 100  # '(' and '[' open at once: each piece is weighed once for each (an absurd weight: 1.1**100)
_NUMBER_RE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)")  # what float() accepts of [+-]?[.\d]+


def _split_break(text: str) -> list[str]:
    """A1111's re.split(re_break, text) (re_break: spaces, the word BREAK, spaces) in linear time (the regex retries a
    run of spaces from each of its characters)."""
    parts, start = [], 0
    for m in _BREAK_WORD.finditer(text):  # (the spaces a match takes after its BREAK hold no BREAK)
        parts.append(text[start:m.start()].rstrip())
        start = _SPACES.match(text, m.end()).end()
    parts.append(text[start:])
    return parts


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split an A1111 prompt into ``(text, weight)`` pieces; see the module docstring. ValueError (one line) for a
    weight that is not a finite number (``(a:99...9)`` with 400 digits is inf) and for more than
    MAX_OPEN_BRACKETS brackets open at once (the time grows as their number times the pieces')."""
    pieces: list[list | None] = []  # [text, weight] while brackets close; None marks a BREAK
    round_open: list[int] = []  # indexes into ``pieces`` where each open bracket started
    square_open: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if piece is not None:
                piece[1] *= factor

    for m in _ATTENTION_RE.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token in "([":
            (round_open if token == "(" else square_open).append(len(pieces))
            if len(round_open) + len(square_open) > MAX_OPEN_BRACKETS:
                raise ValueError(f"prompt: more than {MAX_OPEN_BRACKETS} emphasis brackets open at once (at character "
                                 f"{m.start()}); close them, or escape a literal one as \\( or \\[")
        elif weight is not None and round_open and _NUMBER_RE.fullmatch(weight):
            multiply_from(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            multiply_from(round_open.pop(), ROUND_MULTIPLIER)
        elif token == "]" and square_open:
            multiply_from(square_open.pop(), SQUARE_MULTIPLIER)
        else:
            for i, part in enumerate(_split_break(token)):
                if i > 0:
                    pieces.append(None)
                pieces.append([part, 1.0])

    for start in round_open:
        multiply_from(start, ROUND_MULTIPLIER)
    for start in square_open:
        multiply_from(start, SQUARE_MULTIPLIER)

    merged: list[tuple[str, float]] = []
    for piece in pieces:
        if piece is not None and not math.isfinite(piece[1]):
            raise ValueError(f"prompt: the emphasis weight of {piece[0][:60]!r} is not a finite number ({piece[1]}); "
                             "A1111's usual range is 0.5 to 1.5")
        if piece is None:
            merged.append(BREAK)
        elif merged and merged[-1] is not BREAK and merged[-1][1] == piece[1]:
            merged[-1] = (merged[-1][0] + piece[0], piece[1])
        else:
            merged.append((piece[0], piece[1]))
    return merged or [("", 1.0)]


MAX_FILE_BYTES = 64 << 20  # CLIP's vocab.json is 1.6 MB, merges.txt 0.5 MB


def _check_files(vocab: Path, merges: Path) -> None:
    """vocab.json and merges.txt checked before the tokenizers library reads them: regular files (a FIFO would
    block), of a sane size, UTF-8, vocab.json an object of token -> id and merges.txt not empty. One
    CheckpointError naming the file otherwise."""
    texts = {}
    for f in (vocab, merges):
        size = check_regular_file(f)
        if size > MAX_FILE_BYTES:
            raise CheckpointError(f"{f}: {size} bytes, too large for a CLIP tokenizer file (at most {MAX_FILE_BYTES})")
        try:
            texts[f] = f.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{f}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
        except OSError as e:
            raise CheckpointError(f"{f}: cannot be read ({e.strerror or type(e).__name__})") from None
    try:
        words = json.loads(texts[vocab])
    except (ValueError, RecursionError) as e:
        why = str(e).splitlines()[0] if str(e) else "nested too deeply"
        raise CheckpointError(f"{vocab}: not valid JSON ({why})") from None
    if not isinstance(words, dict) or not all(_is_id(v) for v in words.values()):
        got = "ids that are not integers" if isinstance(words, dict) else f"a JSON {type(words).__name__}"
        raise CheckpointError(f"{vocab}: not a CLIP vocabulary (expected a JSON object of token -> id, got {got})")
    if not VOCAB_SIZE - 2 <= len(words) <= VOCAB_SIZE:
        raise CheckpointError(f"{vocab}: not the SD1 CLIP vocabulary ({len(words)} tokens; SD1's has {VOCAB_SIZE})")
    if not any(line.strip() and not line.startswith("#version") for line in texts[merges].splitlines()):
        raise CheckpointError(f"{merges}: no merges (an empty or truncated merges.txt)")


def _is_id(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 31


def _wrap(chunk: list[int], chunk_len: int = CHUNK_LENGTH) -> list[int]:
    """BOS + chunk + EOS, padded with PAD to ``chunk_len + 2`` tokens."""
    return [BOS, *chunk, EOS] + [PAD] * (chunk_len - len(chunk))


class Tokenizer:
    """SD1 CLIP tokenizer: ids, fixed 77-token batches, 75-token chunks and weighted chunks."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        """Load ``vocab.json``/``merges.txt`` from ``path`` (e.g. a diffusers ``tokenizer/``
        folder) or, by default, from the copy shipped in ``fastsd/assets``. A missing, unreadable or
        malformed file, or another vocabulary than SD1's: one-line CheckpointError naming the file."""
        root = files("fastsd") / "assets" if path is None else Path(path)
        with as_file(root / "vocab.json") as vocab, as_file(root / "merges.txt") as merges:
            _check_files(Path(vocab), Path(merges))
            try:
                words, pairs = BPE.read_file(str(vocab), str(merges))
                bpe = BPE(words, pairs, continuing_subword_prefix="", end_of_word_suffix="</w>",
                          fuse_unk=False, unk_token="<|endoftext|>")
            except Exception as e:  # noqa: BLE001 - tokenizers raises bare Exceptions ("Token `i` out of vocabulary")
                why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise CheckpointError(f"{root}: vocab.json and merges.txt do not make a CLIP tokenizer ({why})") from None
        tk = _BPETokenizer(bpe)
        tk.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                              normalizers.Lowercase()])
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False)])
        tk.add_special_tokens(["<|startoftext|>", "<|endoftext|>"])  # matched in the text as they are
        self._tok = tk
        if tk.get_vocab_size() != VOCAB_SIZE or tk.token_to_id("<|startoftext|>") != BOS:
            raise CheckpointError(f"{root / 'vocab.json'}: not the SD1 CLIP vocabulary ({tk.get_vocab_size()} tokens "
                                  f"with <|startoftext|> = {tk.token_to_id('<|startoftext|>')}; SD1's has {VOCAB_SIZE} "
                                  f"with <|startoftext|> = {BOS})")
        self.comma = tk.token_to_id(",</w>")

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS and without truncation."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)] if texts else []

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        """(B, 77) LongTensor: BOS + ids[:75] + EOS, padded with EOS (diffusers' SD1 input)."""
        if isinstance(texts, str):
            texts = [texts]
        rows = [_wrap(ids[:CHUNK_LENGTH]) for ids in self.encode_batch(texts)]
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), MAX_LENGTH)

    @staticmethod
    def chunks(ids: list[int], chunk_len: int = CHUNK_LENGTH) -> torch.Tensor:
        """(n_chunks, chunk_len + 2) LongTensor: ``ids`` cut every ``chunk_len`` tokens, each
        piece wrapped as BOS + piece + EOS + EOS padding. No ids gives one (empty) chunk."""
        starts = range(0, max(len(ids), 1), chunk_len)
        rows = [_wrap(ids[s : s + chunk_len], chunk_len) for s in starts]
        return torch.tensor(rows, dtype=torch.long)

    def encode_weighted(self, text: str, comma_backtrack: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """A1111 prompt -> (ids, weights), both (n_chunks, 77); ids long, weights float32.

        Emphasis comes from :func:`parse_prompt_attention`; each piece is tokenized separately
        (as A1111 does). ``BREAK`` closes the current chunk, padding it (a leading or repeated
        BREAK therefore yields an empty chunk; a trailing one does not). ``comma_backtrack``
        is A1111's "comma padding backtrack" setting (its default there is 20; 0 disables):
        when a chunk is full and its last comma is at most that many tokens back, the tokens
        after the comma move to the next chunk.
        """
        ids, weights, _ = self.encode_with_embeddings(text, None, comma_backtrack)
        return ids, weights

    def encode_with_embeddings(self, text: str, embeddings, comma_backtrack: int = 0
                               ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int, object, int]]]:
        """`encode_weighted` with textual-inversion embeddings (A1111's rule): where the ids of a piece
        continue with the ids of an embedding's name (``embeddings.find``, fastsd/embeddings.py), its n
        vectors take n token slots (placeholder id 0, the piece's weight); an embedding that does not fit
        in the rest of a chunk starts the next. Returns (ids, weights, fixes), fixes = [(chunk, position in
        the 77-token row, embedding, k)]: that token embedding is to be replaced by the embedding's vector k."""
        parsed = parse_prompt_attention(text)
        chunks: list[list[tuple[int, float, tuple | None]]] = []  # (id, weight, (embedding, k) or None)
        chunk: list[tuple[int, float, tuple | None]] = []
        last_comma = -1

        def close() -> None:
            nonlocal chunk, last_comma
            chunks.append(chunk)
            chunk, last_comma = [], -1

        for (piece, weight), ids in zip(parsed, self.encode_batch([p for p, _ in parsed])):
            if (piece, weight) == BREAK:
                close()
                continue
            pos = 0
            while pos < len(ids):
                token = ids[pos]
                if token == self.comma:
                    last_comma = len(chunk)
                elif comma_backtrack and len(chunk) == CHUNK_LENGTH and last_comma != -1 \
                        and len(chunk) - last_comma <= comma_backtrack:
                    moved = chunk[last_comma + 1 :]
                    chunk = chunk[: last_comma + 1]
                    close()
                    chunk = moved
                if len(chunk) == CHUNK_LENGTH:
                    close()
                found = embeddings.find(ids, pos) if embeddings is not None else None
                if found is None:
                    chunk.append((token, weight, None))
                    pos += 1
                    continue
                emb, n_ids = found
                if len(chunk) + len(emb.vectors) > CHUNK_LENGTH:
                    close()
                chunk += [(0, weight, (emb, k)) for k in range(len(emb.vectors))]
                pos += n_ids
        if chunk or not chunks:
            close()

        ids_rows = [_wrap([t for t, _, _ in c]) for c in chunks]
        weight_rows = [[1.0] + [w for _, w, _ in c] + [1.0] * (CHUNK_LENGTH + 1 - len(c)) for c in chunks]
        fixes = [(i, 1 + j, *fix) for i, c in enumerate(chunks) for j, (_, _, fix) in enumerate(c) if fix is not None]
        return torch.tensor(ids_rows, dtype=torch.long), torch.tensor(weight_rows, dtype=torch.float32), fixes
