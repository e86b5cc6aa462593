"""CLIP ViT-L/14 text encoder (OpenAI CLIP / transformers CLIPTextModel). Names mirror the LDM keys under
`cond_stage_model.transformer.`: text_model.{embeddings, encoder.layers.i, final_layer_norm}."""
from __future__ import annotations

import torch
from torch import nn

from fastsd.backends.reference import OPS
from fastsd.config import CLIPConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)  # OpenAI CLIP's GELU approximation


class SelfAttention(nn.Module):
    ops = OPS

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (p(x).view(b, n, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = self.ops.attention(q, k, v, causal=True)  # (B, H, N, Dh); token i sees tokens <= i
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SelfAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.mlp.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp.fc2(quick_gelu(self.mlp.fc1(self.layer_norm2(x))))


class Embedding(nn.Embedding):
    """nn.Embedding whose weight is left uninitialised on the meta device, where a model is built to be filled from
    a file (fastsd.checkpoint): normal_ there goes through torch._refs, which imports torch._dynamo (1-2 s)."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class CLIPTextModel(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        tm = self.text_model = nn.Module()
        tm.embeddings = nn.Module()
        tm.embeddings.token_embedding = Embedding(cfg.vocab_size, cfg.hidden_size)
        tm.embeddings.position_embedding = Embedding(cfg.max_positions, cfg.hidden_size)
        tm.encoder = nn.Module()
        tm.encoder.layers = nn.ModuleList([EncoderLayer(cfg) for _ in range(cfg.num_layers)])
        tm.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, ids: torch.Tensor, clip_skip: int = 1, token_embeds: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, N<=77) -> (hidden (B, N, D), pooled (B, D)).

        clip_skip follows A1111: 1 uses the last layer, k uses the output of layer -k; the final
        LayerNorm is applied either way (as A1111 and diffusers do). token_embeds (B, N, D): used instead of
        token_embedding(ids) (textual inversion puts its vectors there); ids still place the pooled EOS."""
        if not 1 <= clip_skip <= self.cfg.num_layers:
            raise ValueError(f"clip_skip must be in 1..{self.cfg.num_layers}, got {clip_skip}")
        tm = self.text_model
        pos = torch.arange(ids.shape[1], device=ids.device)
        tok = tm.embeddings.token_embedding(ids) if token_embeds is None else token_embeds
        x = tok + tm.embeddings.position_embedding(pos)[None]
        for layer in tm.encoder.layers[: len(tm.encoder.layers) - (clip_skip - 1)]:
            x = layer(x)
        x = tm.final_layer_norm(x)
        eos = (ids == self.cfg.eos_token_id).int().argmax(dim=-1)  # first EOS per row
        pooled = x[torch.arange(x.shape[0], device=x.device), eos]
        return x, pooled
