"""Derive fastsd/assets/vocab.json and merges.txt from OpenAI CLIP's BPE file.

The input is ``bpe_simple_vocab_16e6.txt.gz`` shipped in OpenAI's CLIP package (MIT licence),
e.g. obtained with ``pip download --no-deps openai-clip`` and unpacked. The outputs are laid out
exactly like Hugging Face's openai/clip-vit-large-patch14 ``vocab.json`` / ``merges.txt``
(the tokenizer used by Stable Diffusion 1.x), following CLIP's own ``simple_tokenizer.py``:

* merges: lines ``1 .. 48894`` of the gz file (``lines[1:49152-256-2+1]``); line 0 is a header.
* vocab (49408 ids): the 256 byte-level unicode characters, the same 256 with ``</w>``,
  the 48894 merges joined, then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).

Usage:
    python tools/derive_clip_vocab.py /path/to/clip/bpe_simple_vocab_16e6.txt.gz [out_dir]
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

N_MERGES = 49152 - 256 - 2  # 48894
VOCAB_SIZE = 49408
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "fastsd" / "assets"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible map from the 256 byte values to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    bs = printable[:]
    cs = printable[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def derive(gz_path: Path) -> tuple[dict[str, int], list[str]]:
    """Return (vocab token -> id, merge lines "a b") as CLIP's SimpleTokenizer builds them."""
    lines = gzip.open(gz_path).read().decode("utf-8").split("\n")
    merges = lines[1 : N_MERGES + 1]
    assert len(merges) == N_MERGES
    pairs = [tuple(m.split()) for m in merges]
    assert all(len(p) == 2 for p in pairs), "every merge line must hold exactly two symbols"

    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(p) for p in pairs]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    assert len(tokens) == len(vocab) == VOCAB_SIZE, "tokens must be unique"
    return vocab, [" ".join(p) for p in pairs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gz", type=Path, help="path to bpe_simple_vocab_16e6.txt.gz")
    ap.add_argument("out_dir", type=Path, nargs="?", default=DEFAULT_OUT)
    args = ap.parse_args()

    vocab, merges = derive(args.gz)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with open(args.out_dir / "vocab.json", "w", encoding="utf-8", newline="\n") as f:
        json.dump(vocab, f, ensure_ascii=False, separators=(",", ":"))
    with open(args.out_dir / "merges.txt", "w", encoding="utf-8", newline="\n") as f:
        f.write("#version: 0.2\n")
        f.write("\n".join(merges) + "\n")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {args.out_dir}")


if __name__ == "__main__":
    main()
