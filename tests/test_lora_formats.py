"""LoRA layouts that A1111 (or the tool that writes them) merges and fastsd once refused or read otherwise: a
4-channel change of an inpainting model's 9-channel first convolution (A1111 zero-pads it), SD1 files naming the
text encoder `lora_te1_` (A1111 and diffusers read them), upper-case `.SAFETENSORS` (PEFT alphas, A1111's hash),
ComfyUI's LoraSave files (`diffusion_model.`, `text_encoders.clip_l.transformer.`, `diff` / `diff_b`)."""
import shutil

import pytest
import torch
from oracles import rel_err
from safetensors.torch import load_file, save_file
from test_lora import assert_same_state, state, tiny

from fastsd import CheckpointError
from fastsd.backends.cpu_pack import dense_weight
from fastsd.testing_lora import write_random_lora


def _rnd(g, *shape, s=0.3):
    return torch.randn(*shape, generator=g) * s


@pytest.mark.parametrize("backend, kind", [("torch", "lora"), ("torch", "locon_cp"), ("torch", "loha"),
                                           ("torch", "full"), ("cpu", "lora"), ("cpu", "loha")])  # (cpu: both paths)
def test_a_4_channel_change_of_an_inpainting_conv_in_is_zero_padded_as_a1111(tmp_path, backend, kind):
    """A1111's network_apply_weights: a change of 4 input channels for a layer of 9 (the inpainting UNet's first
    convolution) is zero-padded to 9 (`F.pad(updown, (0, 0, 0, 0, 0, 5))`): the latent channels change, the mask and
    masked-image channels don't. Before, the whole file was refused. Unloading restores the bits."""
    pipe = tiny(backend, preset="tiny-inpainting")
    pipe.generate("a cat", steps=1, width=64, height=64, seed=1, progress=False)  # the cpu backend's weights packed
    state0 = state(pipe)
    w = dense_weight(pipe.unet.get_submodule("input_blocks.0.0")).clone()
    out, key, g = w.shape[0], "lora_unet_conv_in", torch.Generator().manual_seed(1)
    assert w.shape[1] == 9
    if kind == "lora":  # kohya LoCon: down (r, 4, 3, 3), up (out, r, 1, 1), alpha / r
        down, up = _rnd(g, 3, 4, 3, 3), _rnd(g, out, 3, 1, 1)
        sd = {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(2.0)}
        change = (up.flatten(1) @ down.flatten(1)).reshape(out, 4, 3, 3) * (2.0 / 3)
    elif kind == "locon_cp":  # LyCORIS' Tucker core: down (r, 4, 1, 1), mid (r, r, 3, 3), up (out, r, 1, 1)
        down, mid, up = _rnd(g, 3, 4, 1, 1), _rnd(g, 3, 3, 3, 3), _rnd(g, out, 3, 1, 1)
        sd = {f"{key}.lora_down.weight": down, f"{key}.lora_mid.weight": mid, f"{key}.lora_up.weight": up,
              f"{key}.alpha": torch.tensor(2.0)}
        change = torch.einsum("nmkl,on,mc->ockl", mid, up.flatten(1), down.flatten(1)) * (2.0 / 3)
    elif kind == "loha":  # (w1_a w1_b) * (w2_a w2_b), alpha / dim
        f = {n: _rnd(g, out, 2) if n.endswith("_a") else _rnd(g, 2, 4 * 9) for n in ("w1_a", "w1_b", "w2_a", "w2_b")}
        sd = {f"{key}.hada_{n}": t for n, t in f.items()} | {f"{key}.alpha": torch.tensor(1.0)}
        change = ((f["w1_a"] @ f["w1_b"]) * (f["w2_a"] @ f["w2_b"])).reshape(out, 4, 3, 3) * 0.5
    else:  # LyCORIS 'full'
        change = _rnd(g, out, 4, 3, 3, s=0.05)
        sd = {f"{key}.diff": change}
    path = str(tmp_path / "conv_in.safetensors")
    save_file(sd, path)
    pipe.load_lora(path, 0.7)
    got = dense_weight(pipe.unet.get_submodule("input_blocks.0.0")) - w
    assert rel_err(got[:, :4], 0.7 * change) <= 1e-5
    assert torch.equal(got[:, 4:], torch.zeros_like(got[:, 4:]))
    pipe.unload_loras()
    assert_same_state(pipe, state0)


def test_the_padding_is_only_for_an_inpainting_conv_in(tmp_path):
    """A 4-channel LoRA's conv_in on a 4-channel model merges as it is; a 9-channel (inpainting) LoRA's on a 4-channel
    model is still refused, and so is DoRA on the padded layer (A1111's decomposition fails there too)."""
    pipe = tiny(preset="tiny-inpainting")
    state0 = state(pipe)
    g, key = torch.Generator().manual_seed(2), "lora_unet_input_blocks_0_0"
    sd = {f"{key}.lora_down.weight": _rnd(g, 2, 4, 3, 3), f"{key}.lora_up.weight": _rnd(g, 32, 2, 1, 1),
          f"{key}.dora_scale": torch.rand(32, 1, 1, 1, generator=g) + 1}
    save_file(sd, str(tmp_path / "dora.safetensors"))
    with pytest.raises(CheckpointError, match=r"DoRA magnitudes for the first 4 of its 9 input channels"):
        pipe.load_lora(str(tmp_path / "dora.safetensors"))
    assert_same_state(pipe, state0)
    plain = tiny()
    sd = {f"{key}.lora_down.weight": _rnd(g, 2, 9, 3, 3), f"{key}.lora_up.weight": _rnd(g, 32, 2, 1, 1)}
    save_file(sd, str(tmp_path / "nine.safetensors"))
    with pytest.raises(CheckpointError, match=r"takes 9 input channels"):
        plain.load_lora(str(tmp_path / "nine.safetensors"))


def test_sd1_text_encoder_named_lora_te1_merges_as_lora_te(tmp_path):
    """`lora_te1_text_model_...` in an SD1 file: A1111 maps it to the SD1 text encoder ("some SD1 Loras also have
    correct compvis keys"), diffusers' kohya converter reads lora_te1_ as the first text encoder: the same bits as the
    file with lora_te_. A file with lora_te2_ is still an SDXL LoRA."""
    pipe = tiny()
    path = str(tmp_path / "te.safetensors")
    write_random_lora(path, pipe, fmt="kohya_ldm", rank=4, alpha=2.0, layers=[])
    sd = load_file(path)
    assert sd and all(k.startswith("lora_te_") for k in sd)
    te1 = {k.replace("lora_te_", "lora_te1_", 1): v for k, v in sd.items()}
    save_file(te1, str(tmp_path / "te1.safetensors"))
    pipe.load_lora(path, 0.8)
    want = state(pipe)
    pipe.unload_loras()
    pipe.load_lora(str(tmp_path / "te1.safetensors"), 0.8)
    assert_same_state(pipe, want)
    pipe.unload_loras()
    te2 = {k.replace("lora_te1_", "lora_te2_"): v.clone() for k, v in te1.items()}
    save_file(te1 | te2, str(tmp_path / "xl.safetensors"))
    with pytest.raises(CheckpointError, match="an SDXL LoRA"):
        pipe.load_lora(str(tmp_path / "xl.safetensors"))


def test_upper_case_safetensors_extension_reads_peft_alphas_and_hashes_as_a1111(tmp_path):
    """`x.SAFETENSORS`: PEFT's alphas come from its lora_adapter_metadata header and the "Lora hashes" value is the
    hash of the tensor data, as for `x.safetensors` (A1111 compares extensions in lower case). Before, the header
    was skipped (scale 1 instead of alpha / r) and the whole file hashed."""
    pipe = tiny()
    lower = str(tmp_path / "style.safetensors")
    write_random_lora(lower, pipe, fmt="peft", rank=4, alpha=1.0, layers=[])
    upper = str(tmp_path / "upper" / "style.SAFETENSORS")
    (tmp_path / "upper").mkdir()
    shutil.copy(lower, upper)
    pipe.load_lora(lower, 0.9)
    want, hash_ = state(pipe), pipe.loras[-1].short_hash()
    pipe.unload_loras()
    pipe.load_lora(upper, 0.9)
    assert_same_state(pipe, want)
    assert pipe.loras[-1].short_hash() == hash_


def test_comfyui_lora_save_files_merge_as_comfyui(tmp_path):
    """ComfyUI's LoraSave (model diff extraction): `diffusion_model.<LDM path>` and
    `text_encoders.clip_l.transformer.<path>` with lora_up / lora_down (no alpha), `diff_b` for each bias beside them
    and a 1-d `diff` (+ `diff_b`) for each norm layer (its bias_diff option, on by default). ComfyUI merges
    W += w * up @ down, b += w * diff_b, a norm's weight += w * diff: checked so; a kohya LoRA's diff_b is not
    scaled by its alpha (ComfyUI's diff patches have none); a layer with two bias changes is refused."""
    pipe = tiny()
    state0 = state(pipe)
    g, sd, want = torch.Generator().manual_seed(3), {}, {}
    targets = [("unet", "input_blocks.1.1.proj_in", "diffusion_model."),
               ("unet", "input_blocks.1.0.in_layers.2", "diffusion_model."),
               ("clip", "text_model.encoder.layers.0.self_attn.q_proj", "text_encoders.clip_l.transformer.")]
    for model, name, prefix in targets:
        module = getattr(pipe, model).get_submodule(name)
        w = module.weight
        down, up = _rnd(g, 2, *w.shape[1:]).half(), _rnd(g, w.shape[0], 2, *([1, 1] if w.dim() == 4 else [])).half()
        bias = _rnd(g, w.shape[0], s=0.1).half()
        sd |= {f"{prefix}{name}.lora_up.weight": up, f"{prefix}{name}.lora_down.weight": down,
               f"{prefix}{name}.diff_b": bias}
        want[model, name] = (up.float().flatten(1) @ down.float().flatten(1)).reshape(w.shape), bias.float()
    for name in ("input_blocks.1.1.norm", "input_blocks.1.0.in_layers.0"):  # GroupNorms: a 1-d diff, a diff_b
        n = pipe.unet.get_submodule(name).weight.shape[0]
        diff, bias = _rnd(g, n, s=0.1).half(), _rnd(g, n, s=0.1).half()
        sd |= {f"diffusion_model.{name}.diff": diff, f"diffusion_model.{name}.diff_b": bias}
        want["unet", name] = diff.float(), bias.float()
    path = str(tmp_path / "ComfyUI_extracted_lora_00001_.safetensors")
    save_file(sd, path)
    pipe.load_lora(path, 0.6)
    for (model, name), (dw, db) in want.items():
        module = getattr(pipe, model).get_submodule(name)
        key = f"{'diffusion_model.' if model == 'unet' else 'text_model.'}{name}"
        assert rel_err(module.weight - state0[f"{name}.weight"], 0.6 * dw) <= 1e-5, key
        assert rel_err(module.bias - state0[f"{name}.bias"], 0.6 * db) <= 1e-5, key
    pipe.unload_loras()
    assert_same_state(pipe, state0)

    key, name = "lora_unet_input_blocks_1_1_proj_in", "input_blocks.1.1.proj_in"
    kohya = {f"{key}.lora_down.weight": _rnd(g, 4, 32, 1, 1), f"{key}.lora_up.weight": _rnd(g, 32, 4, 1, 1),
             f"{key}.alpha": torch.tensor(1.0), f"{key}.diff_b": _rnd(g, 32, s=0.1)}
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    pipe.load_lora(str(tmp_path / "kohya.safetensors"), 0.5)
    assert rel_err(pipe.unet.get_submodule(name).bias - state0[f"{name}.bias"], 0.5 * kohya[f"{key}.diff_b"]) <= 1e-5
    pipe.unload_loras()
    save_file(kohya | {f"{key}.lora_B.bias": kohya[f"{key}.diff_b"].clone()}, str(tmp_path / "two.safetensors"))
    with pytest.raises(CheckpointError, match="has two bias changes: diff_b and lora_B.bias"):
        pipe.load_lora(str(tmp_path / "two.safetensors"))
    assert_same_state(pipe, state0)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_text_encoder_extractions_change_the_embedding_tables(tmp_path, backend):
    """ComfyUI's LoraSave of a text encoder: lora_up / lora_down for the token and position embedding tables (as for
    any 2-d weight), a 1-d `diff` for final_layer_norm, and a (zero) LoRA for CLIP's text_projection, which SD1 never
    reads (no SD1 text encoder has it: not read); LyCORIS' full extraction: `lora_te_..._token_embedding.diff`.
    The tables change as ComfyUI merges them (the prompt's encoding with them); unloading restores the bits."""
    pipe = tiny(backend)
    pipe.generate("a cat", steps=1, width=64, height=64, seed=1, progress=False)  # the cpu backend's weights packed
    state0 = state(pipe)
    g, pre = torch.Generator().manual_seed(4), "text_encoders.clip_l.transformer.text_model."
    tok, pos = (state0[f"text_model.embeddings.{n}_embedding.weight"] for n in ("token", "position"))
    width = tok.shape[1]
    up, down = _rnd(g, tok.shape[0], 2).half(), _rnd(g, 2, width).half()
    pdiff, ndiff = _rnd(g, *pos.shape, s=0.05).half(), _rnd(g, width, s=0.05).half()
    sd = {f"{pre}embeddings.token_embedding.lora_up.weight": up,
          f"{pre}embeddings.token_embedding.lora_down.weight": down,
          f"{pre}embeddings.position_embedding.diff": pdiff, f"{pre}final_layer_norm.diff": ndiff,
          "text_encoders.clip_l.transformer.text_projection.lora_up.weight": torch.zeros(width, 2).half(),
          "text_encoders.clip_l.transformer.text_projection.lora_down.weight": torch.zeros(2, width).half()}
    path = str(tmp_path / "comfy_te.safetensors")
    save_file(sd, path)
    pipe.load_lora(path, 0.5)
    emb = pipe.clip.text_model.embeddings
    assert rel_err(emb.token_embedding.weight - tok, 0.5 * up.float() @ down.float()) <= 1e-5
    assert rel_err(emb.position_embedding.weight - pos, 0.5 * pdiff.float()) <= 1e-5
    norm = pipe.clip.text_model.final_layer_norm.weight - state0["text_model.final_layer_norm.weight"]
    assert rel_err(norm, 0.5 * ndiff.float()) <= 1e-5
    assert pipe.loras[-1].layers == 3
    pipe.unload_loras()
    assert_same_state(pipe, state0)

    diff = _rnd(g, *tok.shape, s=0.01)
    save_file({"lora_te_text_model_embeddings_token_embedding.diff": diff}, str(tmp_path / "full.safetensors"))
    pipe.load_lora(str(tmp_path / "full.safetensors"), 0.8)
    assert rel_err(pipe.clip.text_model.embeddings.token_embedding.weight - tok, 0.8 * diff) <= 1e-5
    pipe.unload_loras()
    assert_same_state(pipe, state0)
