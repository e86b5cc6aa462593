"""Prompts -> CLIP context, the A1111 way: 75-token chunks (each BOS + 75 + EOS, encoded separately and
concatenated), emphasis weights `(word:1.2)` applied to the hidden states with the mean restored, and
prompt / negative prompt padded to the same number of chunks.

Textual-inversion embeddings (fastsd/embeddings.py) are put in here: the token embeddings of the chunk are
looked up, the placeholder slots replaced by the embedding's vectors, and CLIP runs on those (its
`token_embeds`), as A1111's EmbeddingsWithFixes does. The model keeps its own weights and vocabulary, so
loading, LoRA merging and the CPU path's packed weights never see an embedding, and switching embeddings
costs nothing."""
from __future__ import annotations

import torch

from fastsd.models.clip import CLIPTextModel
from fastsd.tokenizer import Tokenizer


def _pad_chunks(ids: torch.Tensor, weights: torch.Tensor, n: int, empty: tuple[torch.Tensor, torch.Tensor]):
    """Append empty chunks (BOS, EOS padding; weight 1) until there are n."""
    k = n - ids.shape[0]
    return (torch.cat([ids, empty[0].expand(k, -1)]), torch.cat([weights, empty[1].expand(k, -1)])) if k else (ids, weights)


def _token_embeds(clip: CLIPTextModel, ids: torch.Tensor, fixes: list) -> torch.Tensor | None:
    """The chunks' token embeddings with the embeddings' vectors in their slots; None when there are none."""
    if not fixes:
        return None
    table = clip.text_model.embeddings.token_embedding
    x = table(ids).clone()
    for chunk, pos, emb, k in fixes:
        x[chunk, pos] = emb.vectors[k].to(x.dtype)
    return x


def _mean_ratio(mean: torch.Tensor, new_mean: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """A1111's mean restore factor mean / new_mean, each chunk's; 1 for a chunk whose means are at round-off level
    (below 1e-6 of its values' size: an encoder whose hidden states average 0, as a random one's LayerNorm gives),
    where the factor would divide by about 0 (inf, NaN) or wipe the chunk out."""
    flat = (mean.abs() <= 1e-6 * size) | (new_mean.abs() <= 1e-6 * size)
    return torch.where(flat, torch.ones_like(mean), mean / new_mean)


@torch.no_grad()
def encode_prompts(clip: CLIPTextModel, tokenizer: Tokenizer, prompts: list[str], *, clip_skip: int = 1,
                   device: torch.device | None = None, embeddings=None) -> torch.Tensor:
    """Prompts -> context (len(prompts), 77 * n_chunks, D); all rows get the same chunk count. `embeddings`
    (fastsd.embeddings.Embeddings): the textual inversions prompt words may name."""
    parsed = [tokenizer.encode_with_embeddings(p, embeddings) for p in prompts]
    n = max(ids.shape[0] for ids, _, _ in parsed)
    empty = tokenizer.encode_weighted("")
    device = device or clip.text_model.final_layer_norm.weight.device
    out = []
    for ids, weights, fixes in parsed:
        ids, weights = _pad_chunks(ids, weights, n, empty)
        ids = ids.to(device)
        z, _ = clip(ids, clip_skip=clip_skip, token_embeds=_token_embeds(clip, ids, fixes))  # (n, 77, D)
        if (weights != 1).any():  # A1111: scale by the weights, then restore each chunk's original mean
            w = weights.to(device=device, dtype=z.dtype)[..., None]
            mean = z.float().mean(dim=(1, 2), keepdim=True)
            z = z * w
            new_mean = z.float().mean(dim=(1, 2), keepdim=True)
            z = z * _mean_ratio(mean, new_mean, z.float().abs().mean(dim=(1, 2), keepdim=True)).to(z.dtype)
        out.append(z.reshape(1, -1, z.shape[-1]))
    ctx = torch.cat(out)
    if not torch.isfinite(ctx).all():  # e.g. (word:1e30): the image would come out black
        if any((weights != 1).any() for _, weights, _ in parsed):
            raise ValueError("the prompt's emphasis weights overflow the text encoding; use weights of a sane size "
                             "(A1111's usual range is 0.5 to 1.5)")
        from fastsd.checkpoint import damaged_weights

        raise ValueError("the text encoding overflows (NaN or infinite): " + (
            damaged_weights(clip=clip) or "an embedding (or LoRA) in the prompt holds values far out of range"))
    return ctx
