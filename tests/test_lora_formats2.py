"""LoRA layouts A1111's Lora extension reads (or mis-reads) that fastsd refused or had not been held to: both
orientations of LyCORIS' dora_scale, a layer's `.scale`, LyCORIS GLoRA, kohya's DyLoRA files, LyCORIS IA3 on
convolutions, a bundled embedding of another width. Each merge is held to diffusers / PEFT where they read the format,
else to the formula computed here from the file's tensors (float64); each refusal is one line naming the key, with
the model left as it was."""
import re
import warnings

import pytest
import torch
from oracles import rel_err
from safetensors.torch import load_file, save_file
from test_lora import assert_same_state, state, tiny

from fastsd import CheckpointError
from fastsd.backends.cpu_pack import dense_weight
from fastsd.lora import parse_prompt
from fastsd.testing_lora import glora_factors, ia3_factors, kohya_key, set_metadata, write_random_lora

TO_K = "input_blocks.1.1.transformer_blocks.0.attn2.to_k"  # (32, 128): not square
FF = "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj"  # (256, 32)
PROJ_IN = "input_blocks.1.1.proj_in"  # a 1x1 convolution (32, 32, 1, 1)
SKIP = "input_blocks.4.0.skip_connection"  # a 1x1 convolution (64, 32, 1, 1)
CONV = "input_blocks.1.0.in_layers.2"  # a 3x3 convolution (32, 32, 3, 3)
FC1 = "text_model.encoder.layers.0.mlp.fc1"


def _weight(pipe, model, name):
    return dense_weight(getattr(pipe, model).get_submodule(name)).detach().clone()


def _save(tmp_path, name, sd):
    path = str(tmp_path / f"{name}.safetensors")
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return path


def _refused(pipe, path, pattern):
    """The load fails with one line matching `pattern`, and no weight has changed."""
    before = state(pipe)
    with pytest.raises(CheckpointError, match=pattern) as e:
        pipe.load_lora(path)
    assert "\n" not in str(e.value)
    assert_same_state(pipe, before)
    assert pipe.loras == []


# ---- 1. DoRA: dora_scale (1, in, ...) and (out, 1, ...) ------------------------------------------------------------

def _norms(v, form):
    """The norms of v per input column ("columns": A1111's apply_weight_decompose) or per output row ("rows":
    LyCORIS' wd_on_out), shaped as the magnitudes are ((1, in, ...) / (out, 1, ...))."""
    return torch.linalg.vector_norm(v, dim=[d for d in range(v.dim()) if d != (1 if form == "columns" else 0)],
                                    keepdim=True)


def _decomposed(w, updown, m, form):
    """V = W + scale * delta scaled to the magnitudes m, m / ||V|| * V, in float64: W' at weight 1."""
    v = w.double() + updown.double()
    return v * (m.double() / _norms(v, form))


@pytest.mark.parametrize("form", ["columns", "rows"])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_dora_scale_both_orientations(tmp_path, form, backend):
    """kohya / LyCORIS dora_scale as (1, in, ...) (LyCORIS' default, A1111's column norms) and as (out, 1, ...)
    (LyCORIS' wd_on_out: row norms), on non-square linears, a 1x1 and a 3x3 convolution and a text encoder layer:
    W + weight * (m / ||V|| * V - W), V = W + alpha / rank * up @ down, the norm running over the dims where the
    magnitudes have size 1."""
    pipe = tiny(backend)
    pipe.generate("a cat", steps=1, width=64, height=64, seed=1, progress=False)  # (cpu: the weights packed)
    state0, g, sd, want = state(pipe), torch.Generator().manual_seed(11), {}, {}
    for model, name in [("unet", TO_K), ("unet", FF), ("unet", SKIP), ("unet", CONV), ("clip", FC1)]:
        w, key = _weight(pipe, model, name), kohya_key(model, name)
        down = torch.randn(3, *w.shape[1:], generator=g) * 0.2
        up = torch.randn(w.shape[0], 3, *((1, 1) if w.dim() == 4 else ()), generator=g) * 0.2
        updown = (up.flatten(1) @ down.flatten(1)).reshape(w.shape) * (1.5 / 3)
        norms = _norms(w + updown, form)
        m = norms * (1 + 0.1 * torch.randn(norms.shape, generator=g))  # (1, in, ...) or (out, 1, ...)
        sd |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(1.5),
               f"{key}.dora_scale": m}
        want[model, name] = w, w.double() + 0.6 * (_decomposed(w, updown, m, form) - w.double())
    pipe.load_lora(_save(tmp_path, "dora", sd), 0.6)
    for (model, name), (w, ref) in want.items():
        assert rel_err(_weight(pipe, model, name) - w, ref - w.double()) <= 1e-5, name
    pipe.unload_loras()
    assert_same_state(pipe, state0)


def test_dora_rows_at_weight_1_is_peft_dora(tmp_path):
    """At weight 1, a dora_scale (out, 1) file is PEFT's DoRA (lora_magnitude_vector (out,): m / ||W + s B A||
    per row), the format fastsd holds to diffusers' fuse_lora in test_lora.py: the same tensors under PEFT's names
    give the same weights."""
    pipe = tiny()
    g, kohya, peft = torch.Generator().manual_seed(12), {}, {}
    for name in (TO_K, FF):
        w, key = _weight(pipe, "unet", name), kohya_key("unet", name)
        down, up = torch.randn(4, w.shape[1], generator=g) * 0.2, torch.randn(w.shape[0], 4, generator=g) * 0.2
        m = w.norm(dim=1) * (1 + 0.1 * torch.randn(w.shape[0], generator=g))
        kohya |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.dora_scale": m[:, None]}
        peft |= {f"unet.{name}.lora_A.weight": down, f"unet.{name}.lora_B.weight": up,
                 f"unet.{name}.lora_magnitude_vector": m}
    pipe.load_lora(_save(tmp_path, "kohya", kohya))
    ours = {n: _weight(pipe, "unet", n) for n in (TO_K, FF)}
    pipe.unload_loras()
    pipe.load_lora(_save(tmp_path, "peft", peft))
    for n in (TO_K, FF):
        assert rel_err(ours[n], _weight(pipe, "unet", n)) <= 1e-6, n


# ---- 2. `.scale` ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["lora", "loha", "lokr", "full", "ia3", "glora"])
def test_a_layers_scale_replaces_alpha_over_dim(tmp_path, kind):
    """A1111's network.py: `scale` in a layer's tensors is its scale, in place of alpha / dim (calc_scale), for every
    kind but OFT: change = weight * scale * delta."""
    pipe = tiny()
    g, name, key = torch.Generator().manual_seed(13), TO_K, kohya_key("unet", TO_K)
    w = _weight(pipe, "unet", name).double()
    r = lambda *shape: torch.randn(*shape, generator=g).double() * 0.2  # noqa: E731
    if kind == "lora":
        f = {"lora_down.weight": r(4, 128), "lora_up.weight": r(32, 4)}
        delta = f["lora_up.weight"] @ f["lora_down.weight"]
    elif kind == "loha":
        f = {n: r(32, 2) if n.endswith("_a") else r(2, 128)
             for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
        delta = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])
    elif kind == "lokr":
        f = {"lokr_w1": r(4, 4), "lokr_w2_a": r(8, 2), "lokr_w2_b": r(2, 32)}
        delta = torch.kron(f["lokr_w1"], f["lokr_w2_a"] @ f["lokr_w2_b"])
    elif kind == "full":
        f = {"diff": r(32, 128)}
        delta = f["diff"]
    elif kind == "ia3":
        f = ia3_factors(w, g)
        delta = w * f["weight"].double()[:, None]
    else:
        f = glora_factors(w, 4, g, alpha=8.0)
        a1, a2, b1, b2 = (f[f"{k}.weight"].double() for k in ("a1", "a2", "b1", "b2"))
        delta = b2 @ b1 + w @ a2 @ a1
    sd = {f"{key}.{k}": t.float() for k, t in f.items()} | {f"{key}.alpha": torch.tensor(2.0),
                                                            f"{key}.scale": torch.tensor(0.35)}
    pipe.load_lora(_save(tmp_path, kind, sd), 0.8)
    assert rel_err(_weight(pipe, "unet", name).double() - w, 0.8 * 0.35 * delta) <= 1e-5


def test_scale_on_norm_and_oft_as_a1111(tmp_path):
    """LyCORIS 'norm': `scale` scales w_norm, not b_norm (A1111's ex_bias gets the weight only); OFT: A1111's
    NetworkModuleOFT sets its scale to 1, so a file's `scale` changes nothing (the same bits as without it)."""
    pipe = tiny()
    g, norm = torch.Generator().manual_seed(14), "input_blocks.1.1.norm"
    module = pipe.unet.get_submodule(norm)
    w0, b0 = module.weight.detach().clone(), module.bias.detach().clone()
    wn, bn = torch.randn(32, generator=g) * 0.1, torch.randn(32, generator=g) * 0.1
    key = kohya_key("unet", norm)
    pipe.load_lora(_save(tmp_path, "norm", {f"{key}.w_norm": wn, f"{key}.b_norm": bn,
                                            f"{key}.scale": torch.tensor(0.5)}), 0.6)
    assert rel_err(module.weight - w0, 0.6 * 0.5 * wn) <= 1e-6
    assert rel_err(module.bias - b0, 0.6 * bn) <= 1e-6
    pipe.unload_loras()
    key = kohya_key("unet", TO_K)
    oft = {f"{key}.oft_blocks": torch.randn(4, 8, 8, generator=g) * 0.1}
    pipe.load_lora(_save(tmp_path, "oft", oft), 0.7)
    want = state(pipe)
    pipe.unload_loras()
    pipe.load_lora(_save(tmp_path, "oft_scale", oft | {f"{key}.scale": torch.tensor(3.0)}), 0.7)
    assert_same_state(pipe, want)


@pytest.mark.parametrize("bad, pattern", [(torch.ones(2), r"\.scale has shape \(2,\), not one number"),
                                          (torch.tensor(float("nan")), "NaN, infinite"),
                                          (None, "not a LoRA")])
def test_bad_scale_is_refused(tmp_path, bad, pattern):
    pipe = tiny()
    key = kohya_key("unet", TO_K)
    sd = {f"{key}.scale": torch.tensor(1.0)} if bad is None else {
        f"{key}.lora_down.weight": torch.randn(4, 128), f"{key}.lora_up.weight": torch.randn(32, 4),
        f"{key}.scale": bad}
    _refused(pipe, _save(tmp_path, "bad", sd), pattern)


# ---- 3. GLoRA ------------------------------------------------------------------------------------------------------

def a1111_glora(w, f):
    """A1111's network_glora calc_updown, w2b @ w1b + (W @ w2a) @ w1a (w1a = a1, w1b = b1, w2a = a2, w2b = b2), in
    float64, at scale 1 (it sets no dim: calc_scale is 1 whatever the alpha); a 1x1 convolution's factors flattened
    (LyCORIS' own make_weight: .view(size(0), -1))."""
    a1, a2, b1, b2 = (f[f"{k}.weight"].double().flatten(1) for k in ("a1", "a2", "b1", "b2"))
    return (b2 @ b1 + (w.double().flatten(1) @ a2) @ a1).reshape(w.shape)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_glora_merges_as_a1111(tmp_path, backend):
    """LyCORIS' first GLoRA layout (a1 (r, in), a2 (in, r), b1 (r, in), b2 (out, r), alpha) on non-square linears of
    the UNet and text encoder and on 1x1 convolutions: W += weight * (b2 b1 + W a2 a1), alpha not read (A1111); the
    image changes; unloading restores the bits."""
    pipe = tiny(backend)
    plain = pipe.generate("a cat", steps=1, width=64, height=64, seed=1, progress=False)[0]
    state0, g, sd, want = state(pipe), torch.Generator().manual_seed(15), {}, {}
    for model, name in [("unet", TO_K), ("unet", FF), ("unet", PROJ_IN), ("unet", SKIP), ("clip", FC1)]:
        w = _weight(pipe, model, name)
        f = glora_factors(w, 4, g, alpha=1.0)
        sd |= {f"{kohya_key(model, name)}.{k}": t for k, t in f.items()}
        want[model, name] = w, 0.7 * a1111_glora(w, f)
    pipe.load_lora(_save(tmp_path, "glora", sd), 0.7)
    assert pipe.loras[-1].layers == len(want)
    for (model, name), (w, change) in want.items():
        assert rel_err(_weight(pipe, model, name).double() - w.double(), change) <= 1e-5, name
    assert pipe.generate("a cat", steps=1, width=64, height=64, seed=1, progress=False)[0].tobytes() != plain.tobytes()
    pipe.unload_loras()
    assert_same_state(pipe, state0)


@pytest.mark.parametrize("case, pattern", [
    ("lycoris3", r"input_blocks_1_1_transformer_blocks_0_attn2_to_k: GLoRA in LyCORIS 3's layout"),
    ("bm", r"input_blocks_1_1_proj_in: GLoRA with a Tucker core bm\.weight"),
    ("3x3", r"input_blocks_1_0_in_layers_2: GLoRA on a 3x3 convolution"),
    ("no alpha", r"input_blocks_1_1_transformer_blocks_0_attn2_to_k has a1\.weight and a2\.weight and b1\.weight and "
                 r"b2\.weight but not every factor of a LyCORIS GLoRA"),
    ("wrong shape", r"input_blocks_1_1_transformer_blocks_0_attn2_to_k: factors a1\.weight \(4, 32\)")])
def test_glora_a1111_cannot_merge_is_refused(tmp_path, case, pattern):
    """LyCORIS 3's layout (A1111's products don't fit it: it skips those layers), its Tucker core, a 3x3 convolution
    (A1111's matmul fails), a layer without alpha (A1111 takes no module type then) and factors of the wrong size:
    one line naming the layer, the model untouched, even beside a good layer."""
    pipe = tiny()
    g = torch.Generator().manual_seed(16)
    good = {f"{kohya_key('unet', FF)}.{k}": t for k, t in glora_factors(_weight(pipe, "unet", FF), 4, g,
                                                                         alpha=4.0).items()}
    name = {"bm": PROJ_IN, "3x3": CONV}.get(case, TO_K)
    w = _weight(pipe, "unet", name)
    f = glora_factors(w if case != "3x3" else w[:, :, :1, :1], 4, g, alpha=4.0,
                      layout="lycoris3" if case == "lycoris3" else "first")
    if case == "bm":
        f["bm.weight"] = torch.randn(4, 4, 3, 3, generator=g)
    elif case == "3x3":
        f = {k: v.expand(*v.shape[:2], 3, 3) if k == "b2.weight" else v for k, v in f.items()}
    elif case == "no alpha":
        del f["alpha"]
    elif case == "wrong shape":
        f["a1.weight"] = torch.randn(4, 32, generator=g)
    _refused(pipe, _save(tmp_path, case, good | {f"{kohya_key('unet', name)}.{k}": v for k, v in f.items()}), pattern)


# ---- 4. DyLoRA -----------------------------------------------------------------------------------------------------

def test_kohya_dylora_file_merges_at_full_rank(tmp_path):
    """kohya's networks/dylora.py saves its per-rank rows cat-ed into ordinary lora_down / lora_up (+ alpha; metadata
    ss_network_module "networks.dylora"): A1111 merges it as any LoRA, all its rows, scale alpha / rank (dyn None),
    and so does fastsd: the same weights as diffusers' fuse_lora of that file (held in test_lora.py for kohya files)
    are here the hand-computed up @ down * alpha / rank. A <lora:NAME:1:1:DYN> or dyn= tag (A1111's rank cut) is
    refused in one line."""
    pipe = tiny()
    path = str(tmp_path / "dylora.safetensors")
    write_random_lora(path, pipe, fmt="kohya_ldm", rank=8, alpha=4.0, layers=[TO_K, CONV], seed=17)
    set_metadata(path, {"ss_network_module": "networks.dylora", "ss_network_args": '{"unit": "2"}',
                        "ss_network_dim": "8", "ss_network_alpha": "4.0"})
    sd = load_file(path)
    before = {(m, n): _weight(pipe, m, n) for m, n in [("unet", TO_K), ("unet", CONV), ("clip", FC1)]}
    pipe.load_lora(path, 0.9)
    for (model, name), w in before.items():
        key = kohya_key(model, name)
        up, down = sd[f"{key}.lora_up.weight"].double(), sd[f"{key}.lora_down.weight"].double()
        change = (up.flatten(1) @ down.flatten(1)).reshape(w.shape) * 4.0 / 8
        assert rel_err(_weight(pipe, model, name).double() - w.double(), 0.9 * change) <= 1e-5, name
    for tag in ("<lora:dylora:1:1:4>", "<lora:dylora:1:dyn=4>"):
        with pytest.raises(ValueError, match="DyLoRA's dyn dimension is not supported"):
            parse_prompt(f"a cat {tag}")


# ---- 5. IA3 on convolutions ----------------------------------------------------------------------------------------

def peft_ia3_merged(w, v, on_input):
    """PEFT's IA3 merge of a Conv2d of weight w (its tuners/ia3 Conv2d.merge) with ia3_l = 1 + v: LyCORIS' weight v is
    the change from 1 (it starts at 0), PEFT's ia3_l the factor itself (it starts at 1); on_input = PEFT's
    feedforward module (the input channels scaled)."""
    from peft import IA3Config, inject_adapter_in_model

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(w.shape[1], w.shape[0], w.shape[2:], bias=False)

    model = One()
    model.conv.weight.data.copy_(w)
    cfg = IA3Config(target_modules=["conv"], feedforward_modules=["conv"] if on_input else [])
    model = inject_adapter_in_model(cfg, model)
    with torch.no_grad():
        model.conv.ia3_l["default"].copy_(1 + v.reshape(model.conv.ia3_l["default"].shape))
    model.conv.merge()
    return model.conv.get_base_layer().weight.detach()


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_ia3_on_convolutions_matches_peft(tmp_path, backend):
    """LyCORIS IA3 on convolutions (weight (1, C, 1, 1), on_input 0: output channels; 1: input channels), 3x3 and 1x1,
    which A1111's network_ia3 broadcast can't take (it skips them): merged as LyCORIS defines it, W * (1 + weight * v)
    per channel, the weights of PEFT's IA3 merge with ia3_l = 1 + weight * v; unloading restores the bits."""
    pytest.importorskip("peft")
    pipe = tiny(backend)
    pipe.generate("a cat", steps=1, width=64, height=64, seed=1, progress=False)
    state0, g, sd, want = state(pipe), torch.Generator().manual_seed(18), {}, {}
    for name, on_input in [(CONV, False), ("input_blocks.4.0.in_layers.2", True), (SKIP, False), (PROJ_IN, True)]:
        w = _weight(pipe, "unet", name)
        f = ia3_factors(w, g, on_input=on_input)
        assert f["weight"].shape == (1, w.shape[1 if on_input else 0], 1, 1)
        sd |= {f"{kohya_key('unet', name)}.{k}": t for k, t in f.items()}
        want[name] = peft_ia3_merged(w, 0.7 * f["weight"], on_input)
    pipe.load_lora(_save(tmp_path, "ia3", sd), 0.7)
    for name, ref in want.items():
        w = state0[f"{name}.weight"]
        assert rel_err(_weight(pipe, "unet", name) - w, ref - w) <= 1e-5, name
    pipe.unload_loras()
    assert_same_state(pipe, state0)


def test_ia3_vector_of_a_convolution_must_be_lycoris_shape(tmp_path):
    """A 1-d vector on a convolution (not what LyCORIS writes there) and one of the wrong side: one line each."""
    pipe = tiny()
    key = kohya_key("unet", SKIP)
    _refused(pipe, _save(tmp_path, "flat", {f"{key}.weight": torch.randn(64), f"{key}.on_input": torch.tensor(0)}),
             re.escape("IA3 weight (64,) for a convolution (LyCORIS writes a convolution's as (1, C, 1, 1))"))
    _refused(pipe, _save(tmp_path, "side", {f"{key}.weight": torch.randn(1, 64, 1, 1),
                                            f"{key}.on_input": torch.tensor(1)}),
             re.escape("IA3 weight (1, 64, 1, 1) for the input columns of layer (64, 32, 1, 1) (on_input 1)"))


# ---- 6. a bundled embedding of another width -----------------------------------------------------------------------

def test_bundled_embedding_of_another_width_is_skipped_with_a_warning(tmp_path):
    """A1111's networks.py puts a bundled embedding whose width isn't the text encoder's among the skipped embeddings
    and loads the LoRA: so does fastsd, with one warning line naming the file and the embedding; the LoRA's layers
    and its other embeddings are loaded. A broken one (NaN) still refuses the whole file."""
    pipe = tiny()
    state0 = state(pipe)
    path = str(tmp_path / "ink.safetensors")
    write_random_lora(path, pipe, fmt="kohya_ldm", rank=4, layers=[TO_K], text_encoder=False, seed=19)
    width = pipe.clip.text_model.embeddings.token_embedding.weight.shape[1]
    good = torch.randn(2, width, generator=torch.Generator().manual_seed(20)) * 0.01
    sd = load_file(path) | {"bundle_emb.inkstyle.string_to_param.*": good,
                            "bundle_emb.sdtwo.string_to_param.*": torch.randn(1, 1024) * 0.01}
    save_file(sd, path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.load_lora(path, 0.5)
    lines = [str(w.message) for w in caught]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert lines[0].startswith(f"{path}: bundle_emb.sdtwo: an embedding of width 1024") and "skipped" in lines[0]
    assert pipe.loras[-1].layers == 1
    assert [e.name for e in pipe.loras[-1].embeddings] == ["inkstyle"]
    used = pipe.embeddings.used(["inkstyle sdtwo"])
    assert [e.name for e in used] == ["inkstyle"] and torch.equal(used[0].vectors, good)
    assert not torch.equal(_weight(pipe, "unet", TO_K), state0[f"{TO_K}.weight"])
    pipe.unload_loras()
    assert_same_state(pipe, state0)
    save_file(sd | {"bundle_emb.broken.emb_params": torch.full((1, width), float("nan"))}, path)
    _refused(pipe, path, "bundle_emb.broken: an embedding with NaN")
