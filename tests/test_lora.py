"""LoRA: every format against diffusers' load_lora_weights + fuse_lora on the same random weights (weights
within 1e-5 relative, images >= 40 dB), unloading bit for bit on the CPU path, bf16/fp16, bad files, the
A1111 prompt syntax and infotext."""
import hashlib
import math
import re
import struct

import numpy as np
import pytest
import torch
from oracles import rel_err

from fastsd import CheckpointError, load_pipeline
from fastsd.backends.cpu_pack import dense_weight
from fastsd.image import parse_infotext, psnr
from fastsd.lora import lora_path, list_loras, parse_lora_arg, parse_prompt
from fastsd.testing import diffusers_pipeline
from fastsd.testing_lora import diffusers_names, layers_of, write_random_lora

GEN = dict(steps=4, sampler="euler", width=64, height=64, guidance_scale=7.5)
PROMPT = "a photo of an astronaut riding a horse"


def tiny(backend="torch", dtype="fp32", preset="tiny"):
    return load_pipeline(f"random:{preset}", device="cpu", dtype=dtype, backend=backend)


@pytest.fixture(scope="module")
def names():
    return diffusers_names(tiny())


@pytest.fixture(scope="module")
def base_image():
    return generate(tiny())


def start_latents(pipe, size=64):
    f = pipe.config.vae.downscale
    return torch.randn(1, 4, size // f, size // f, generator=torch.Generator().manual_seed(3))


def generate(pipe, prompt=PROMPT, **kw):
    return np.asarray(pipe.generate(prompt, latents=start_latents(pipe), progress=False, **{**GEN, **kw})[0])


def oracle_image(sp, pipe, size=64, steps=GEN["steps"]):
    return sp(PROMPT, num_inference_steps=steps, guidance_scale=GEN["guidance_scale"], height=size, width=size,
              latents=start_latents(pipe, size), output_type="np").images[0]


def assert_matches_diffusers(pipe, sp, names, image_size=64, steps=GEN["steps"]):
    """Every UNet and text encoder weight and bias within 1e-5 relative of diffusers' fused one; the images >= 40 dB."""
    def close(ours, theirs, name):
        assert rel_err(ours.weight, theirs.weight) <= 1e-5, name
        assert (ours.bias is None) == (theirs.bias is None), name
        assert ours.bias is None or rel_err(ours.bias, theirs.bias) <= 1e-5, name

    for ours, theirs in names.items():
        close(pipe.unet.get_submodule(ours), sp.unet.get_submodule(theirs), ours)
    for n in layers_of(pipe.clip):
        theirs = sp.text_encoder.get_submodule(n.removeprefix("text_model.")
                                                if not hasattr(sp.text_encoder, "text_model") else n)
        close(pipe.clip.get_submodule(n), theirs, n)
    ours = pipe.generate(PROMPT, latents=start_latents(pipe, image_size), progress=False,
                         **{**GEN, "width": image_size, "height": image_size, "steps": steps})[0]
    ref = (oracle_image(sp, pipe, image_size, steps) * 255).round().astype(np.uint8)
    assert np.asarray(ours).std() > 5
    assert psnr(ours, ref) >= 40
    return np.asarray(ours)


def fuse_in_diffusers(sp, path, weight, ldm_names: bool):
    sp.load_lora_weights(path, **({"unet_config": sp.unet.config} if ldm_names else {}))
    sp.fuse_lora(components=["unet", "text_encoder"], lora_scale=weight)
    sp.unload_lora_weights()  # the fused weights stay; the PEFT wrappers go


# diffusers maps LDM-named (kohya SDXL-style) files through `_maybe_map_sgm_blocks_to_diffusers`, which takes
# output_blocks.N.1 for an attention block; on a level without attention it is the upsampler (diffusers' bug)
DIFFUSERS_CANT_MAP = {"kohya_ldm": {"output_blocks.2.1.conv"}}


@pytest.mark.parametrize("fmt,rank,alpha,weight", [
    ("kohya_ldm", 4, 2.0, 0.8), ("kohya_diffusers", 16, None, 1.0), ("kohya_diffusers", 32, 8.0, 0.6),
    ("peft", 8, None, 1.0), ("peft", 32, 16.0, 0.7), ("diffusers", 4, None, 1.0)])
def test_lora_matches_diffusers_fuse(tmp_path, names, base_image, fmt, rank, alpha, weight):
    """UNet (attention, resnet LoCon 3x3 convs, 1x1 convs, time embedding, conv_in/out) + text encoder."""
    pipe, ref = tiny(), tiny()
    layers = [n for n in layers_of(pipe.unet) if n not in DIFFUSERS_CANT_MAP.get(fmt, ())]
    path = str(tmp_path / f"{fmt}.safetensors")
    n = write_random_lora(path, pipe, fmt=fmt, rank=rank, alpha=alpha, layers=layers, names=names, seed=rank)
    sp = diffusers_pipeline(ref)
    fuse_in_diffusers(sp, path, weight, fmt == "kohya_ldm")
    pipe.load_lora(path, weight)
    assert [(x.name, x.weight, x.layers) for x in pipe.loras] == [(fmt, weight, n)]
    after = assert_matches_diffusers(pipe, sp, names)
    assert psnr(after, base_image) < 35, "the LoRA should change the image"


def test_formats_map_to_the_same_layers(tmp_path, names):
    """The same factors under each format's names, and as a .pt (torch.load weights_only): equal weights."""
    merged = []
    for fmt in ("kohya_ldm", "kohya_diffusers", "peft", "diffusers", "pt"):
        pipe = tiny()
        path = str(tmp_path / f"{fmt}.safetensors")
        write_random_lora(path, pipe, fmt="kohya_diffusers" if fmt == "pt" else fmt, rank=4, names=names, seed=7)
        if fmt == "pt":
            from safetensors.torch import load_file

            tensors, path = load_file(path), str(tmp_path / "lora.pt")
            torch.save(tensors, path)
        pipe.load_lora(path, 0.5)
        merged.append({**pipe.unet.state_dict(), **pipe.clip.state_dict()})
    for other in merged[1:]:
        assert all(torch.equal(merged[0][k], other[k]) for k in merged[0])


def state(pipe):
    return {k: v.clone() for m in (pipe.unet, pipe.clip) for k, v in m.state_dict().items()}


def assert_same_state(pipe, ref_state):
    now = state(pipe)
    assert now.keys() == ref_state.keys()
    assert all(torch.equal(now[k], ref_state[k]) and now[k].dtype == ref_state[k].dtype for k in now)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cpu_path_switch_and_unload_bit_for_bit(tmp_path, dtype):
    """The CPU backend packs weights at their first call; a LoRA goes in and out of packed layers, switching
    needs no reload, and after unloading the weights and the image are bit for bit those of before."""
    from fastsd.backends.cpu_pack import packing_unavailable

    pipe = tiny("cpu", dtype)
    image0 = generate(pipe, steps=2)
    packed = [n for n, m in pipe.unet.named_modules() if getattr(getattr(m, "weight", None), "is_mkldnn", False)]
    if packing_unavailable(pipe.dtype) is None:
        assert packed, "the first run should have packed weights"
    state0 = state(pipe)
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    write_random_lora(a, pipe, fmt="kohya_ldm", rank=8, alpha=4.0, seed=1)
    write_random_lora(b, pipe, fmt="kohya_ldm", rank=16, seed=2, text_encoder=False)
    pipe.load_lora(a, 1.0)
    image_a = generate(pipe, steps=2)
    pipe.unload_loras()
    pipe.load_lora(b, 0.5)
    image_b = generate(pipe, steps=2)
    assert psnr(image_a, image0) < 35 and psnr(image_b, image0) < 35 and psnr(image_a, image_b) < 35
    # stacking: both merged, then all of it undone
    pipe.load_lora(a, 1.0)
    assert [x.name for x in pipe.loras] == ["b", "a"]
    pipe.unload_loras()
    assert_same_state(pipe, state0)
    assert np.array_equal(generate(pipe, steps=2), image0)
    # the packed reference: the same LoRA merged into a fresh torch-backend pipeline gives the same image
    ref = tiny("torch", dtype)
    ref.load_lora(a, 1.0)
    pipe.load_lora(a, 1.0)
    assert_same_state(pipe, state(ref))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cpu_path_packs_merged_weights_as_their_layers_last_ran(tmp_path, monkeypatch, dtype):
    """A LoRA load packs each merged weight at once, in the form and for the input shape its layer's weight last ran
    packed in (the first call after a load or a switch packs nothing), gives the images a lazily packed load gives,
    and hands the replaced weights' memory back once at its end."""
    from fastsd.backends import cpu, cpu_pack

    pipe = tiny("cpu", dtype)
    if cpu_pack.packing_unavailable(pipe.dtype) is not None:
        pytest.skip(cpu_pack.packing_unavailable(pipe.dtype))
    generate(pipe, steps=2)
    ran = {n: (m._form, m._packed_for) for model in (pipe.unet, pipe.clip) for n, m in model.named_modules()
           if getattr(getattr(m, "weight", None), "is_mkldnn", False)}
    assert ran
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    write_random_lora(a, pipe, fmt="kohya_ldm", rank=8, alpha=4.0, seed=1)
    write_random_lora(b, pipe, fmt="kohya_ldm", rank=4, seed=2)
    trims = []
    monkeypatch.setattr(cpu, "release_freed_memory", lambda: trims.append(1))
    for path in (a, b):  # a first load after a run, then a switch (unload a, load b)
        pipe.unload_loras()
        trims.clear()
        pipe.load_lora(path, 1.0)
        assert len(trims) == 1
        now = {n: (m._form, m._packed_for) for model in (pipe.unet, pipe.clip) for n, m in model.named_modules()
               if getattr(getattr(m, "weight", None), "is_mkldnn", False)}
        assert now == ran  # every layer that ran packed is packed again, as it ran
        before = cpu_pack.PACKED[0]
        image = generate(pipe, steps=2)
        assert cpu_pack.PACKED[0] == before  # the call packed nothing
        lazy = tiny("cpu", dtype)  # the same LoRA loaded before any run: packed at the first call
        lazy.load_lora(path, 1.0)
        assert np.array_equal(image, generate(lazy, steps=2))
    pipe.unload_loras()  # and back: originals (packed at their next call) and the image of before
    assert np.array_equal(generate(pipe, steps=2), generate(tiny("cpu", dtype), steps=2))


@pytest.mark.parametrize("backend, dtype", [("torch", "fp32"), ("cpu", "fp32"), ("cpu", "bf16")])
def test_load_loras_is_loading_them_one_by_one_in_one_pass(tmp_path, monkeypatch, backend, dtype):
    """load_loras merges a set in one pass over the layers (each layer prepared once): the weights of loading
    the files one after another, bit for bit; a bad file or a failure while merging leaves the model as it was."""
    from fastsd import lora as lora_module

    pipe, ref = tiny(backend, dtype), tiny(backend, dtype)
    generate(pipe, steps=1)  # (the cpu path: weights packed, as between a user's images)
    paths = [str(tmp_path / f"{i}.safetensors") for i in range(3)]
    write_random_lora(paths[0], pipe, fmt="kohya_ldm", rank=8, alpha=4.0, seed=1)
    write_random_lora(paths[1], pipe, fmt="kohya_ldm", rank=4, seed=2, text_encoder=False)
    write_random_lora(paths[2], pipe, fmt="kohya_ldm", rank=4, seed=3)
    state0 = state(pipe)
    bad = str(tmp_path / "bad.safetensors")
    open(bad, "wb").write(open(paths[2], "rb").read()[:1000])
    with pytest.raises(CheckpointError, match="bad.safetensors: not a valid safetensors file"):
        pipe.load_loras([(paths[0], 1.0), (bad, 1.0)])  # read and checked before a weight changes
    assert pipe.loras == []
    assert_same_state(pipe, state0)
    calls = []

    def fail_late(*a, **k):  # a failure while merging, after some layers changed
        calls.append(1)
        if len(calls) == 40:
            raise KeyboardInterrupt
        return merged_weight(*a, **k)

    merged_weight = lora_module.merged_weight
    monkeypatch.setattr(lora_module, "merged_weight", fail_late)
    with pytest.raises(KeyboardInterrupt):
        pipe.load_loras([(paths[0], 1.0), (paths[1], 0.5)])
    monkeypatch.setattr(lora_module, "merged_weight", merged_weight)
    assert pipe.loras == [] and len(calls) == 40
    assert_same_state(pipe, state0)
    items = [(paths[0], 0.8), (paths[1], (1.0, -0.5)), (paths[2], 0.3)]
    pipe.load_loras(items)
    for path, weight in items:
        ref.load_lora(path, weight)
    assert [(x.name, x.weight) for x in pipe.loras] == [(x.name, x.weight) for x in ref.loras]
    assert_same_state(pipe, state(ref))
    pipe.unload_loras()
    assert_same_state(pipe, state0)


@pytest.mark.parametrize("backend, dtype, after_run", [("torch", "fp32", False), ("cpu", "fp32", False),
                                                       ("cpu", "bf16", True)])
def test_merging_for_good_keeps_no_originals_and_merges_the_same_bits(tmp_path, backend, dtype, after_run):
    """load_loras(keep_originals=False) (what the CLI does, before any run): the weights and image of the usual
    load, bit for bit, while the replaced weights (packed ones too, after a run) are freed, none kept; the result
    is the model's own from then on: a LoRA loaded after it is unloaded back to it (and a load for good of
    nothing bakes in what is loaded); a bad file still changes nothing."""
    import gc
    import weakref

    pipe, ref = tiny(backend, dtype), tiny(backend, dtype)
    if after_run:  # (the cpu path: weights packed)
        generate(pipe, steps=1)
        generate(ref, steps=1)
    paths = [str(tmp_path / f"{i}.safetensors") for i in range(2)]
    write_random_lora(paths[0], pipe, fmt="kohya_ldm", rank=8, alpha=4.0, seed=1)
    write_random_lora(paths[1], pipe, fmt="kohya_ldm", rank=4, seed=2, text_encoder=False)
    unet_layers = [pipe.unet.get_submodule(n) for n in layers_of(pipe.unet)]
    replaced = [weakref.ref(m.weight) for m in unet_layers + [pipe.clip.get_submodule(n) for n in layers_of(pipe.clip)]]
    state0 = state(pipe)
    bad = str(tmp_path / "bad.safetensors")
    open(bad, "wb").write(open(paths[1], "rb").read()[:1000])
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        pipe.load_loras([(paths[0], 1.0), (bad, 1.0)], keep_originals=False)
    assert_same_state(pipe, state0)
    with pytest.raises(TypeError, match="keep_originals must be True or False"):
        pipe.load_loras([(paths[0], 0.8)], keep_originals="no")
    pipe.load_loras([(paths[0], 0.8)], keep_originals=False)
    ref.load_loras([(paths[0], 0.8)])
    gc.collect()
    assert all(r() is None for r in replaced)  # no copy of any replaced weight is left
    merged0 = state(pipe)
    assert_same_state(pipe, state(ref))
    names = lambda p: [(x.name, x.weight) for x in p.loras]  # noqa: E731
    assert names(pipe) == [("0", 0.8)]
    pipe.unload_loras()  # nothing loaded since: the model stays as it is
    assert_same_state(pipe, merged0) and names(pipe) == [("0", 0.8)]
    pipe.load_lora(paths[1], 0.5)  # kept as usual: its originals are the weights merged for good
    ref.load_lora(paths[1], 0.5)
    assert_same_state(pipe, state(ref))
    assert np.array_equal(generate(pipe), generate(ref))
    assert names(pipe) == names(ref) == [("0", 0.8), ("1", 0.5)]
    pipe.unload_loras()
    assert_same_state(pipe, merged0)
    assert names(pipe) == [("0", 0.8)]
    held = [weakref.ref(m.weight) for m in unet_layers]  # (dense now, also where they ran packed)
    pipe.load_lora(paths[1], 0.5)
    gc.collect()
    assert all(r() is not None for r in held)  # kept to unload it
    pipe.load_loras([], keep_originals=False)  # bakes in what is loaded
    gc.collect()
    assert all(r() is None for r in held)
    pipe.unload_loras()
    assert_same_state(pipe, state(ref))
    assert names(pipe) == [("0", 0.8), ("1", 0.5)]


def test_a_stopped_merge_for_good_refuses_to_generate(tmp_path, monkeypatch):
    """keep_originals=False frees each replaced weight as it goes, so a failure while merging can't put the model
    back: it then refuses to generate or load until it is loaded again (never a half-merged image)."""
    from fastsd import lora as lora_module

    pipe = tiny()
    path = str(tmp_path / "a.safetensors")
    write_random_lora(path, pipe, fmt="kohya_ldm", rank=4, seed=1)
    calls, merged_weight = [], lora_module.merged_weight

    def fail_late(*a, **k):
        calls.append(1)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return merged_weight(*a, **k)

    monkeypatch.setattr(lora_module, "merged_weight", fail_late)
    with pytest.raises(KeyboardInterrupt):
        pipe.load_loras([(path, 1.0)], keep_originals=False)
    monkeypatch.setattr(lora_module, "merged_weight", merged_weight)
    for call in (lambda: generate(pipe), lambda: pipe.load_lora(path), pipe.unload_loras):
        with pytest.raises(ValueError, match=r"stopped \(KeyboardInterrupt\) after merging 9 of .* load the model"):
            call()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_factors_merge_as_their_fp32_values(tmp_path, dtype):
    """A LoRA file's fp16 / bf16 factors (LCM-LoRA's are fp16) are held so while a load reads them all and made fp32
    a layer at a time: the merge is the one of the same values stored as fp32, bit for bit; values whose sum is
    beyond fp16's range are not taken for infinite."""
    from safetensors.torch import load_file, save_file

    half, full = str(tmp_path / "half.safetensors"), str(tmp_path / "full.safetensors")
    pipe = tiny()
    write_random_lora(half, pipe, fmt="kohya_ldm", rank=8, alpha=4.0, seed=1, dtype=dtype)
    sd = load_file(half)
    key = next(k for k in sd if k.endswith("lora_down.weight") and sd[k].numel() >= 64)
    sd[key] = torch.full_like(sd[key], 2000.0)  # fp16 sum: inf; the values are fine
    save_file(sd, half)
    save_file({k: v.float() for k, v in sd.items()}, full)
    ref = tiny()
    pipe.load_lora(half)
    ref.load_lora(full)
    assert_same_state(pipe, state(ref))


def test_a_layer_that_last_ran_dense_is_not_packed_at_a_merge(monkeypatch):
    """A layer whose last call ran its weight dense (the tuner chose plain or Winograd at that shape) keeps a
    replaced weight dense: nothing is packed for a form it no longer runs in."""
    from fastsd.backends import cpu, cpu_pack, cpu_tune

    if cpu_pack.packing_unavailable(torch.float32):
        pytest.skip(cpu_pack.packing_unavailable(torch.float32))
    conv = cpu.BACKEND.prepare(torch.nn.Conv2d(8, 16, 3, padding=1).requires_grad_(False))
    with torch.no_grad():
        conv(torch.randn(1, 8, 9, 9).contiguous(memory_format=torch.channels_last))  # packed (the default)
        assert conv.weight.is_mkldnn

        class Plain:
            def choose(self, key, candidates, default):
                return "plain"

        monkeypatch.setattr(cpu_tune, "tuner", Plain)
        x = torch.randn(1, 8, 5, 5).contiguous(memory_format=torch.channels_last)
        conv(x)  # another shape, run plain: the weight dense again
        assert not conv.weight.is_mkldnn
        cpu.BACKEND.plain_weights(conv)
        new = torch.randn(16, 8, 3, 3).contiguous(memory_format=torch.channels_last)
        conv.weight = torch.nn.Parameter(new, requires_grad=False)
        cpu.BACKEND.prepare_replaced(conv)
        assert not conv.weight.is_mkldnn and conv.weight is not None
        assert torch.allclose(conv(x), torch.nn.functional.conv2d(x, new, conv.bias, padding=1), atol=1e-5)


@pytest.mark.parametrize("extra", [{}, {"dora": "columns"}, {"fmt": "peft", "bias": True}])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_merge_is_the_fp32_merge_rounded_once(tmp_path, dtype, extra):
    """(and so for DoRA's decomposition and a bias's change)"""
    pipe32, pipe = tiny(), tiny(dtype=dtype)
    path = str(tmp_path / "l.safetensors")
    write_random_lora(path, pipe32, **{"fmt": "kohya_diffusers", **extra}, rank=8, alpha=4.0,
                      names=diffusers_names(pipe32))
    # the fp32 merge of the half-precision original weights, rounded once, is what the merge must give
    ref = tiny()
    for model in (ref.unet, ref.clip):
        model.to(pipe.dtype).float()
    ref.load_lora(path, 0.9)
    before = state(pipe)
    pipe.load_lora(path, 0.9)
    got, want = state(pipe), state(ref)
    assert all(torch.equal(got[k], want[k].to(pipe.dtype)) for k in got)
    moved = {k.rpartition(".")[2] for k in got if not torch.equal(got[k], before[k])}
    assert moved == ({"weight", "bias"} if extra.get("bias") else {"weight"})
    assert generate(pipe, steps=2).std() > 5


# ---- bad files: one line, the model unchanged ----------------------------------------------------------

def _kohya(pipe, path, extra: dict, valid=True, alpha=True):
    """A kohya file with valid layers (when `valid`) and the `extra` tensors after them."""
    from safetensors.torch import load_file, save_file

    write_random_lora(path, pipe, fmt="kohya_ldm", rank=4, alpha=2.0 if alpha else None, seed=3)
    sd = load_file(path) if valid else {}
    sd.update(extra)
    save_file(sd, path)


def _pair(name, down, up):
    return {f"{name}.lora_down.weight": torch.randn(*down), f"{name}.lora_up.weight": torch.randn(*up)}


def _huge_pair():
    """Finite factors (their sums too) whose update at weight 1000 overflows fp32 (fp16's at weight 1)."""
    pair = _pair("lora_unet_input_blocks_1_0_in_layers_2", (4, 32, 3, 3), (32, 4, 1, 1))
    return {k: v.sign() * 1e18 for k, v in pair.items()}


HADA_KEYS = ("w1_a", "w1_b", "w2_a", "w2_b")
TO_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # (diffusers' name: the kohya file's
# LDM-named layers change that layer too, and a bad layer is refused before two names of one layer are)
BAD = {
    "sdxl": (_pair("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", (4, 1280), (1280, 4)), "SDXL LoRA"),
    "bundled broken embedding": ({"bundle_emb.mytok.string_to_param.*": torch.full((2, 128), float("nan"))},
                                 re.escape("bundle_emb.mytok: an embedding with NaN")),  # (SD2's: skipped, formats2)
    "sd2": (_pair("lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k", (4, 1024), (32, 4)),
            "Stable Diffusion 2.x"),
    "no layer": (_pair("lora_unet_input_blocks_1_1_transformer_blocks_3_attn1_to_q", (4, 32), (32, 4)),
                 "1 LoRA layers match no layer"),
    "shape": (_pair("lora_unet_input_blocks_1_0_in_layers_2", (4, 32, 3, 3), (48, 4, 1, 1)), "do not fit"),
    "inpainting": (_pair("lora_unet_conv_in", (4, 9, 3, 3), (32, 4, 1, 1)), "a LoRA for a 9-channel model"),
    "loha part": ({"lora_unet_conv_in.hada_w1_a": torch.randn(4, 4)}, "not every factor of a LyCORIS LoHa"),
    "loha core shape": ({f"lora_unet_conv_in.hada_{k}": torch.randn(4, 4) for k in ("w1_a", "w1_b", "w2_a", "w2_b", "t1")},
                        "do not fit"),
    "locon core on a linear": ({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.randn(4, 32),
                                "lora_unet_input_blocks_1_1_proj_in.lora_mid.weight": torch.randn(4, 4, 3, 3),
                                "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.randn(32, 4)}, "do not fit"),
    "lokr core, whole w2": ({"lora_unet_conv_in.lokr_w1": torch.randn(2, 2), "lora_unet_conv_in.lokr_w2":
                             torch.randn(16, 2, 3, 3), "lora_unet_conv_in.lokr_t2": torch.randn(3, 3, 3, 3)},
                            "CP core lokr_t2 for a whole lokr_w2"),
    "lokr shape": ({"lora_unet_conv_in.lokr_w1": torch.randn(2, 2), "lora_unet_conv_in.lokr_w2": torch.randn(8, 8)},
                   "do not fit"),
    "lokr whole and split": ({"lora_unet_conv_in.lokr_w1": torch.randn(2, 2), "lora_unet_conv_in.lokr_w1_a":
                              torch.randn(2, 1), "lora_unet_conv_in.lokr_w1_b": torch.randn(1, 2),
                              "lora_unet_conv_in.lokr_w2": torch.randn(8, 8)}, "has lokr_w1 both whole and as"),
    "mixed": ({"lora_unet_conv_in.lokr_w1": torch.randn(2, 2), "lora_unet_conv_in.lora_up.weight": torch.randn(4, 4)},
              "mixes factors"),
    "half pair": ({"lora_unet_conv_in.lora_down.weight": torch.randn(4, 4, 3, 3)}, "not every factor of a LoRA"),
    "dora scale shape": (_pair("lora_unet_input_blocks_1_0_in_layers_2", (4, 32, 3, 3), (32, 4, 1, 1))
                         | {"lora_unet_input_blocks_1_0_in_layers_2.dora_scale": torch.rand(1, 32)},
                         re.escape("DoRA dora_scale (1, 32) vs layer (32, 32, 3, 3)")),
    "dora scale both ways": (_pair("lora_unet_input_blocks_1_1_proj_in", (4, 32), (32, 4))
                             | {"lora_unet_input_blocks_1_1_proj_in.dora_scale": torch.rand(32, 32)},
                             "DoRA dora_scale"),
    "dora alone": ({"lora_unet_conv_in.dora_scale": torch.rand(1, 4, 1, 1)}, "not every factor of a LoRA"),
    "peft magnitude on loha": ({f"lora_unet_conv_in.hada_{k}": torch.randn(4, 4) for k in HADA_KEYS}
                               | {"lora_unet_conv_in.lora_magnitude_vector": torch.rand(32)},
                               "PEFT's DoRA goes with lora_A / lora_B"),
    "two magnitudes": (_pair("lora_unet_input_blocks_1_1_proj_in", (4, 32), (32, 4))
                       | {"lora_unet_input_blocks_1_1_proj_in.dora_scale": torch.rand(1, 32),
                          "lora_unet_input_blocks_1_1_proj_in.lora_magnitude_vector": torch.rand(32)}, "two DoRA"),
    "full shape": ({"lora_unet_conv_in.diff": torch.randn(32, 4, 1, 1)}, "do not fit"),
    "full bias shape": ({"lora_unet_conv_in.diff": torch.randn(32, 4, 3, 3),
                         "lora_unet_conv_in.diff_b": torch.randn(4)},
                        re.escape("bias change diff_b (4,) vs layer bias (32,)")),
    "bias without a bias": ({f"{TO_Q}.diff": torch.randn(32, 32), f"{TO_Q}.diff_b": torch.randn(32)},
                            re.escape("a bias change diff_b (32,) for a layer without a bias")),
    "diff_b alone": ({"lora_unet_conv_in.diff_b": torch.randn(32)}, "not every factor of a LyCORIS 'full'"),
    "lora bias on loha": ({f"lora_unet_conv_in.hada_{k}": torch.randn(4, 4) for k in HADA_KEYS}
                          | {"lora_unet_conv_in.lora_B.bias": torch.randn(32)}, "mixes factors"),
    "nan magnitude": (_pair("lora_unet_input_blocks_1_1_proj_in", (4, 32), (32, 4))
                      | {"lora_unet_input_blocks_1_1_proj_in.dora_scale": torch.full((1, 32), float("nan"))}, "NaN"),
    "norm on a linear": ({f"{TO_Q}.w_norm": torch.randn(32)}, "w_norm for a linear layer, not a norm layer"),
    "lora on a norm": (_pair("lora_unet_input_blocks_1_0_in_layers_0", (4, 32), (32, 4)),
                       re.escape("lora_down.weight for a GroupNorm (a norm layer takes LyCORIS' w_norm / b_norm)")),
    "norm shape": ({"lora_unet_input_blocks_1_0_in_layers_0.w_norm": torch.randn(16)}, "do not fit"),
    "norm bias shape": ({"lora_unet_input_blocks_1_0_in_layers_0.w_norm": torch.randn(32),
                         "lora_unet_input_blocks_1_0_in_layers_0.b_norm": torch.randn(16)},
                        re.escape("bias change b_norm (16,) vs layer bias (32,)")),
    "b_norm alone": ({"lora_unet_input_blocks_1_0_in_layers_0.b_norm": torch.randn(32)},
                     "not every factor of a LyCORIS 'norm'"),
    "oft blocks shape": ({f"{TO_Q}.oft_blocks": torch.randn(3, 10, 10)}, "do not fit"),
    "boft pairing": ({f"{TO_Q}.oft_blocks": torch.randn(5, 8, 4, 4)}, "do not fit"),  # stage 5 pairs rows 32 apart
    "oft rescale shape": ({f"{TO_Q}.oft_blocks": torch.randn(4, 8, 8), f"{TO_Q}.rescale": torch.rand(16)},
                          "do not fit"),
    "oft both": ({f"{TO_Q}.oft_blocks": torch.randn(4, 8, 8), f"{TO_Q}.oft_diag": torch.randn(4, 8, 8)},
                 "both oft_blocks and oft_diag"),
    "rescale alone": ({f"{TO_Q}.rescale": torch.rand(32)}, "not every factor of a OFT"),
    "ia3 on a convolution": ({"lora_unet_conv_in.weight": torch.randn(32), "lora_unet_conv_in.on_input":
                              torch.tensor(0)}, re.escape("IA3 weight (32,) for a convolution")),
    "ia3 side": ({"lora_unet_time_embedding_linear_1.weight": torch.randn(128),  # (diffusers' name of time_embed.0)
                  "lora_unet_time_embedding_linear_1.on_input": torch.tensor(1)},
                 re.escape("IA3 weight (128,) for the input columns of layer (128, 32) (on_input 1)")),
    "ia3 without on_input": ({f"{TO_Q}.weight": torch.randn(32), "lora_unet_conv_in.on_input": torch.tensor(0)},
                             "not every factor of a LyCORIS IA3"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_lora_one_line_and_model_unchanged(tmp_path, case):
    pipe = tiny("cpu")
    generate(pipe, steps=1)  # weights packed
    good = str(tmp_path / "good.safetensors")
    write_random_lora(good, pipe, fmt="kohya_ldm", rank=4, seed=9, text_encoder=False)
    pipe.load_lora(good)  # a LoRA already merged stays merged, untouched
    state0 = state(pipe)
    path = str(tmp_path / f"{case.replace(' ', '_')}.safetensors")
    extra, match = BAD[case]
    _kohya(pipe, path, extra)
    with pytest.raises(CheckpointError, match=match) as e:
        pipe.load_lora(path)
    assert "\n" not in str(e.value)
    assert_same_state(pipe, state0)
    assert [x.name for x in pipe.loras] == ["good"]


def _norm_names(pipe) -> dict[str, str]:
    """fastsd (LDM) name -> diffusers name of the UNet's GroupNorm / LayerNorm layers (matched by weight storage in
    the twin, as testing_lora.diffusers_names matches the LoRA-able layers)."""
    from fastsd.testing import unet_twin

    twin = unet_twin(pipe)
    norms = lambda m: [n for n, x in m.named_modules() if isinstance(x, (torch.nn.GroupNorm, torch.nn.LayerNorm))]  # noqa: E731
    by_ptr = {twin.get_submodule(n).weight.data_ptr(): n for n in norms(twin)}
    return {n: by_ptr[pipe.unet.get_submodule(n).weight.data_ptr()] for n in norms(pipe.unet)}


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_lycoris_norm_as_a1111(tmp_path, backend):
    """LyCORIS 'norm' (its train_norm: w_norm / b_norm on the GroupNorm and LayerNorm layers, beside a LoCon's
    pairs in one file), under kohya's diffusers names for the UNet and the text encoder's: each norm's weight and
    bias become W + m * w_norm and b + m * b_norm (A1111's network_norm: no alpha, scale 1), the LoCon layers are
    merged as without them, the image changes; unloading gives every weight back bit for bit."""
    from safetensors.torch import load_file, save_file

    names_pipe = tiny()
    unet_norms, lin_names = _norm_names(names_pipe), diffusers_names(names_pipe)
    pipe = tiny(backend)
    path, pairs_only = str(tmp_path / "norm.safetensors"), str(tmp_path / "pairs.safetensors")
    write_random_lora(pairs_only, names_pipe, fmt="kohya_diffusers", rank=4, alpha=2.0, names=lin_names, seed=3)
    sd, want, g = load_file(pairs_only), {}, torch.Generator().manual_seed(0)
    text_norms = {n: n for n, m in pipe.clip.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    for model, prefix, norms in (("unet", "lora_unet_", unet_norms), ("clip", "lora_te_", text_norms)):
        for ours, theirs in norms.items():
            m = getattr(pipe, model).get_submodule(ours)
            w, b = torch.randn(m.weight.shape, generator=g) * 0.1, torch.randn(m.bias.shape, generator=g) * 0.1
            sd[f"{prefix}{theirs.replace('.', '_')}.w_norm"], sd[f"{prefix}{theirs.replace('.', '_')}.b_norm"] = w, b
            want[model, ours] = (m.weight.detach().float() + 0.7 * w, m.bias.detach().float() + 0.7 * b)
    assert len(want) >= 40 and any(m == "clip" for m, _ in want)
    save_file(sd, path)
    plain, before = generate(pipe, steps=1), state(pipe)
    ref = tiny(backend)
    ref.load_lora(pairs_only, 0.7)
    pipe.load_lora(path, 0.7)
    after = state(pipe)
    for (model, name), (w, b) in want.items():
        m = getattr(pipe, model).get_submodule(name)
        assert torch.allclose(m.weight, w, rtol=0, atol=1e-6) and torch.allclose(m.bias, b, rtol=0, atol=1e-6), name
    norm_layers = {name for _, name in want}
    for k, v in state(ref).items():  # the pairs' layers: as the file without the norms merges them
        if k.rsplit(".", 1)[0] not in norm_layers:
            assert torch.equal(after[k], v), k
    assert not np.array_equal(generate(pipe, steps=1), plain)
    pipe.unload_loras()
    assert_same_state(pipe, before)


def _peft_with_metadata(path, pipe, names, meta):
    """A PEFT-format LoRA (UNet only) whose lora_adapter_metadata header is `meta` (JSON text)."""
    from safetensors.torch import load_file, save_file

    write_random_lora(path, pipe, fmt="peft", rank=4, alpha=8.0, text_encoder=False, names=names)
    save_file(load_file(path), path, metadata={"lora_adapter_metadata": meta})


PEFT_BAD = {  # a header PEFT never writes -> one line naming the field, before anything is merged
    "list": ("[1, 2]", "header is an array, not a JSON object"),
    "null": ("null", "header is null"),
    "alpha string": ('{"unet.r": 4, "unet.lora_alpha": "abc"}', 'unet.lora_alpha is "abc", not a finite number'),
    "r zero": ('{"unet.r": 0, "unet.lora_alpha": 8}', "unet.r is 0, not a positive number"),
    "r string": ('{"unet.r": "4", "unet.lora_alpha": 8}', 'unet.r is "4"'),
    "rank pattern zero": ('{"unet.r": 4, "unet.lora_alpha": 8, "unet.rank_pattern": {"to_q": 0}}', "not a positive"),
    "pattern list": ('{"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": [1]}', "alpha_pattern is not an object"),
    "bad regex": ('{"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {"([": 2}}', "is not a module name"),
    # a pattern that takes Python's re minutes against a layer name (catastrophic backtracking): never run
    "slow regex": ('{"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {"([a-z_0-9]+[a-z_0-9]*)*\\\\.QQ": 2}}',
                   "is not a module name"),
    "rslora": ('{"unet.r": 4, "unet.lora_alpha": 8, "unet.use_rslora": "yes"}', "use_rslora is not true or false"),
}


@pytest.mark.parametrize("case", list(PEFT_BAD))
def test_bad_peft_metadata_one_line_and_model_unchanged(tmp_path, names, case):
    pipe = tiny()
    state0 = state(pipe)
    path = str(tmp_path / "peft.safetensors")
    meta, match = PEFT_BAD[case]
    _peft_with_metadata(path, pipe, names, meta)
    with pytest.raises(CheckpointError, match=re.escape(match)) as e:
        pipe.load_lora(path, keep_originals=False)
    assert "\n" not in str(e.value) and path in str(e.value)
    assert_same_state(pipe, state0)
    _peft_with_metadata(path, pipe, names, '{"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": '
                        '{"down_blocks.0.attentions.0.proj_in": 2}}')  # a module name, as diffusers writes them
    pipe.load_lora(path)


@pytest.mark.parametrize("kind", ["lora", "lora with alpha", "loha"])
def test_rank_0_layers_are_refused_before_any_merge(tmp_path, kind):
    pipe = tiny()
    state0 = state(pipe)
    path = str(tmp_path / "r0.safetensors")
    layer = "lora_unet_input_blocks_1_0_emb_layers_1"
    if kind == "loha":
        extra = {f"{layer}.hada_w{i}_a": torch.zeros(32, 0) for i in (1, 2)}
        extra.update({f"{layer}.hada_w{i}_b": torch.zeros(0, 128) for i in (1, 2)})
        match = "hada_w1_a is empty, shape (32, 0)"
    else:
        extra = {f"{layer}.lora_down.weight": torch.zeros(0, 128), f"{layer}.lora_up.weight": torch.zeros(32, 0)}
        if kind == "lora with alpha":
            extra[f"{layer}.alpha"] = torch.tensor(4.0)
        match = "has rank 0"
    from safetensors.torch import load_file, save_file

    _kohya(pipe, path, {})  # valid layers too: a failure mid-merge would have changed them for good
    sd = {k: v for k, v in load_file(path).items() if not k.startswith(layer + ".")}
    save_file({**sd, **extra}, path)
    with pytest.raises(CheckpointError, match=re.escape(match)):
        pipe.load_lora(path, keep_originals=False)
    assert_same_state(pipe, state0)
    generate(pipe, steps=1)  # (a model left half-merged for good refuses to generate)


def test_not_a_lora_and_wrong_arguments(tmp_path):
    from safetensors.torch import save_file

    pipe = tiny()
    state0 = state(pipe)
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, tmp_path / "full.safetensors")
    save_file({"weights": torch.zeros(2)}, tmp_path / "x.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    for name, match in (("full", "full model checkpoint"), ("x", "not a LoRA"), ("junk", "not a"),
                        ("missing", "no such file")):
        with pytest.raises(CheckpointError, match=match):
            pipe.load_lora(str(tmp_path / f"{name}.safetensors"))
    for weight in (float("nan"), (1.0, float("inf")), (1.0, 2.0, 3.0), "1", True):
        with pytest.raises(ValueError, match="finite"):
            pipe.load_lora(str(tmp_path / "x.safetensors"), weight)
    for weight in (1e308, -1000.5, (0.0, 1e30), 10 ** 400):  # A1111 takes them; here a merge would overflow or give noise
        with pytest.raises(ValueError, match="within -1000 to 1000"):
            pipe.load_lora(str(tmp_path / "x.safetensors"), weight)
    assert_same_state(pipe, state0)
    assert pipe.loras == []


@pytest.mark.parametrize("what", ["weight", "bias"])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_a_merge_that_overflows_is_refused_and_rolled_back(tmp_path, backend, what):
    """(a bias too: LyCORIS 'full''s diff_b)"""
    from safetensors.torch import load_file, save_file

    pipe = tiny(backend)
    generate(pipe, steps=1)  # (cpu: weights packed)
    state0 = state(pipe)
    path = str(tmp_path / "huge.safetensors")
    _kohya(pipe, path, _huge_pair())  # valid layers first: merged before the bad one, then put back
    if what == "bias":  # the layer as LyCORIS 'full', its bias's change finite but beyond fp32 at weight 1000
        layer = "lora_unet_input_blocks_1_0_in_layers_2"
        sd = {k: v for k, v in load_file(path).items() if not k.startswith(layer + ".")}
        save_file(sd | {f"{layer}.diff": torch.zeros(32, 32, 3, 3), f"{layer}.diff_b": torch.full((32,), 1e36)}, path)
    with pytest.raises(ValueError, match=f"LoRA huge: lora_unet_input_blocks_1_0_in_layers_2 at weight 1000 takes the "
                                         f"layer's {what}") as e:
        pipe.load_lora(path, 1000)
    assert "\n" not in str(e.value)
    assert_same_state(pipe, state0)
    assert pipe.loras == []
    pipe.load_lora(path, 1e-3)  # the same file at a sane weight merges
    assert [x.name for x in pipe.loras] == ["huge"]


@pytest.mark.parametrize("kind", ["lora", "lora with biases"])
def test_interrupted_merge_rolls_back(tmp_path, monkeypatch, names, kind):
    """An exception in the middle of merging (here the 5th layer) puts every weight (and bias) back."""
    import fastsd.lora as lora_mod

    pipe = tiny("cpu")
    generate(pipe, steps=1)
    path = str(tmp_path / "l.safetensors")
    if kind == "lora":
        write_random_lora(path, pipe, fmt="kohya_ldm", rank=4, seed=5)
    else:  # lora_B.bias on every layer that has a bias
        write_random_lora(path, pipe, fmt="peft", rank=4, seed=5, names=names, bias=True,
                          layers=[n for n in layers_of(pipe.unet) if pipe.unet.get_submodule(n).bias is not None])
    pipe.load_lora(path, 0.3)
    state0 = state(pipe)
    real, calls, moved = lora_mod.merged_weight, [], []

    def flaky(*args):
        calls.append(1)
        if len(calls) == 5:
            moved.extend(k.rpartition(".")[2] for k, v in state(pipe).items() if not torch.equal(v, state0[k]))
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(lora_mod, "merged_weight", flaky)
    with pytest.raises(KeyboardInterrupt):
        pipe.load_lora(path, 1.0)
    assert set(moved) == ({"weight"} if kind == "lora" else {"weight", "bias"})  # (what the rollback put back)
    assert_same_state(pipe, state0)
    monkeypatch.setattr(lora_mod, "merged_weight", real)
    pipe.unload_loras()
    pipe.load_lora(path, 0.3)
    assert_same_state(pipe, state0)


# ---- LyCORIS LoHa / LoKr ----------------------------------------------------------------------------------

def _lycoris(pipe, kind, targets, g, whole_w2=False):
    """A kohya-named LoHa / LoKr state dict for `targets` [(model, name)] and the delta each layer must get
    (computed here from the definitions: Hadamard product of two low-rank products; Kronecker product as
    an einsum), with alpha 2."""
    sd, want = {}, {}
    for model, name in targets:
        w = dense_weight(getattr(pipe, model).get_submodule(name))
        out, cin, k = w.shape[0], w.shape[1], tuple(w.shape[2:])
        key = ("lora_unet_" if model == "unet" else "lora_te_") + name.replace(".", "_")
        rnd = lambda *shape: torch.randn(*shape, generator=g) * 0.3  # noqa: E731
        if kind == "loha":
            f = {"w1_a": rnd(out, 4), "w1_b": rnd(4, w[0].numel()), "w2_a": rnd(out, 4), "w2_b": rnd(4, w[0].numel())}
            delta = ((f["w1_a"] @ f["w1_b"]) * (f["w2_a"] @ f["w2_b"])).reshape(w.shape) * (2.0 / 4)
            sd.update({f"{key}.hada_{n}": t for n, t in f.items()})
        else:
            a, b = 2, 2 if cin % 2 == 0 else 1
            c, d = out // a, cin // b
            w1 = rnd(a, b)
            if whole_w2:
                w2 = rnd(c, d, *k)
                sd.update({f"{key}.lokr_w1": w1, f"{key}.lokr_w2": w2})
                scale = 1.0  # no decomposed factor: no dim, alpha unused (A1111)
            else:
                w2a, w2b = rnd(c, 3), rnd(3, d * math.prod(k))
                w2 = (w2a @ w2b).reshape(c, d, *k)
                sd.update({f"{key}.lokr_w1": w1, f"{key}.lokr_w2_a": w2a, f"{key}.lokr_w2_b": w2b})
                scale = 2.0 / 3
            spatial = "xy"[:len(k)]
            delta = torch.einsum(f"ij,kl{spatial}->ikjl{spatial}", w1, w2).reshape(w.shape) * scale
        sd[f"{key}.alpha"] = torch.tensor(2.0)
        want[(model, name)] = delta
    return sd, want


@pytest.mark.parametrize("kind,whole_w2", [("loha", False), ("lokr", False), ("lokr", True)])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_lycoris_loha_lokr_merge_by_their_definitions(tmp_path, kind, whole_w2, backend):
    from safetensors.torch import save_file

    pipe = tiny(backend)
    generate(pipe, steps=1)  # the cpu backend's weights packed
    targets = [("unet", "input_blocks.1.0.in_layers.2"), ("unet", "input_blocks.1.1.proj_in"),
               ("unet", "input_blocks.1.1.transformer_blocks.0.attn1.to_q"), ("unet", "output_blocks.0.0.skip_connection"),
               ("clip", "text_model.encoder.layers.0.mlp.fc1")]
    before = {t: getattr(pipe, t[0]).get_submodule(t[1]).state_dict()["weight"].clone() for t in targets}
    sd, want = _lycoris(pipe, kind, targets, torch.Generator().manual_seed(3), whole_w2)
    path = str(tmp_path / f"{kind}.safetensors")
    save_file(sd, path)
    pipe.load_lora(path, 0.7)
    for t in targets:
        got = getattr(pipe, t[0]).get_submodule(t[1]).state_dict()["weight"]
        assert rel_err(got - before[t], 0.7 * want[t]) <= 1e-5, t
    pipe.unload_loras()
    assert all(torch.equal(getattr(pipe, t[0]).get_submodule(t[1]).state_dict()["weight"], before[t]) for t in targets)


def _cp_file(kind: str, key: str, w: torch.Tensor, g: torch.Generator):
    """LyCORIS factors with CP (Tucker) cores for the 3x3 convolution weight w (out, in, 3, 3), rank 3, alpha 2,
    and the convolution each defines, as LyCORIS runs it unmerged (f(x, weight) -> the delta's output for x at
    weight 1): LoCon = conv1x1(up) . conv3x3(mid) . conv1x1(down); a core's product sum_ij a[i, o] t[i, j] b[j, c]."""
    out, cin = w.shape[:2]
    rnd = lambda *shape: torch.randn(*shape, generator=g) * 0.3  # noqa: E731
    conv = torch.nn.functional.conv2d
    if kind == "locon_cp":
        down, mid, up = rnd(3, cin, 1, 1), rnd(3, 3, 3, 3), rnd(out, 3, 1, 1)
        sd = {f"{key}.lora_down.weight": down, f"{key}.lora_mid.weight": mid, f"{key}.lora_up.weight": up,
              f"{key}.alpha": torch.tensor(2.0)}
        return sd, lambda x: conv(conv(conv(x, down), mid, padding=1), up) * (2.0 / 3)

    def core_product(t, a, b):  # the weight as a sum of rank-1 terms, one per (i, j)
        return sum(t[i, j][None, None] * a[i][:, None, None, None] * b[j][None, :, None, None]
                   for i in range(t.shape[0]) for j in range(t.shape[1]))

    if kind == "loha_cp":
        f = {n: rnd(3, out if n.endswith("_a") else cin) for n in ("w1_a", "w1_b", "w2_a", "w2_b")}
        f |= {"t1": rnd(3, 3, 3, 3), "t2": rnd(3, 3, 3, 3)}
        sd = {f"{key}.hada_{n}": t for n, t in f.items()}
        weight = core_product(f["t1"], f["w1_a"], f["w1_b"]) * core_product(f["t2"], f["w2_a"], f["w2_b"])
    else:  # lokr_cp: w1 (2, 1) scales the blocks of w2 = cp(t2, w2_a, w2_b) (out / 2, in, 3, 3)
        w1, t2, w2a, w2b = rnd(2, 1), rnd(3, 3, 3, 3), rnd(3, out // 2), rnd(3, cin)
        sd = {f"{key}.lokr_w1": w1, f"{key}.lokr_t2": t2, f"{key}.lokr_w2_a": w2a, f"{key}.lokr_w2_b": w2b}
        w2 = core_product(t2, w2a, w2b)
        weight = torch.cat([w1[0, 0] * w2, w1[1, 0] * w2])
    return sd | {f"{key}.alpha": torch.tensor(2.0)}, lambda x: conv(x, weight, padding=1) * (2.0 / 3)


@pytest.mark.parametrize("kind", ["locon_cp", "loha_cp", "lokr_cp"])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_lycoris_cp_cores_merge_as_their_convolutions_run(tmp_path, kind, backend):
    """LoCon's lora_mid, LoHa's hada_t1/t2, LoKr's lokr_t2 (A1111 merges them): the merged layer's change, run as
    a convolution, gives what the factors give run as LyCORIS defines them; unloading restores the bits."""
    from safetensors.torch import save_file

    pipe = tiny(backend)
    generate(pipe, steps=1)  # the cpu backend's weights packed
    targets = ["input_blocks.1.0.in_layers.2", "out.2"]  # 3x3 convolutions, 32 -> 32 and 32 -> 4
    g, sd, runs = torch.Generator().manual_seed(5), {}, {}
    before = {n: dense_weight(pipe.unet.get_submodule(n)).clone() for n in targets}
    for n in targets:
        part, runs[n] = _cp_file(kind, "lora_unet_" + n.replace(".", "_"), before[n], g)
        sd |= part
    path = str(tmp_path / f"{kind}.safetensors")
    save_file(sd, path)
    pipe.load_lora(path, 0.7)
    x = torch.randn(1, 32, 9, 7, generator=g)
    for n in targets:
        change = dense_weight(pipe.unet.get_submodule(n)) - before[n]
        assert rel_err(torch.nn.functional.conv2d(x, change, padding=1), 0.7 * runs[n](x)) <= 1e-5, n
    pipe.unload_loras()
    assert all(torch.equal(dense_weight(pipe.unet.get_submodule(n)), before[n]) for n in targets)


# ---- LyCORIS full, DoRA, LoRA biases ------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_lycoris_full_merges_as_a1111(tmp_path, backend):
    """LyCORIS 'full' as A1111's network_full: weight += w * diff, bias += w * diff_b, no alpha scaling (an alpha in
    the file is not read); a linear's or 1x1 convolution's diff with or without the 1x1; unloading restores the bits
    of weights and biases (the cpu backend's packed ones too)."""
    from safetensors.torch import save_file

    pipe = tiny(backend)
    generate(pipe, steps=1)  # the cpu backend's weights packed
    state0 = state(pipe)
    targets = {("unet", "input_blocks.1.0.in_layers.2"): None,  # 3x3 convolution with a bias
               ("unet", "input_blocks.1.1.proj_in"): (32, 32),  # a 1x1 convolution's diff without its 1x1
               ("unet", "input_blocks.1.1.transformer_blocks.0.attn1.to_q"): None,  # no bias: diff only
               ("clip", "text_model.encoder.layers.0.mlp.fc1"): None}
    g, sd, before = torch.Generator().manual_seed(4), {}, {}
    for (model, name), shape in targets.items():
        module = getattr(pipe, model).get_submodule(name)
        before[name] = dense_weight(module).clone(), None if module.bias is None else module.bias.clone()
        key = ("lora_unet_" if model == "unet" else "lora_te_") + name.replace(".", "_")
        sd[f"{key}.diff"] = torch.randn(shape or before[name][0].shape, generator=g) * 0.1
        sd[f"{key}.alpha"] = torch.tensor(4.0)
        if module.bias is not None:
            sd[f"{key}.diff_b"] = torch.randn(module.bias.shape, generator=g) * 0.1
    path = str(tmp_path / "full.safetensors")
    save_file(sd, path)
    pipe.load_lora(path, 0.7)
    for (model, name), shape in targets.items():
        module = getattr(pipe, model).get_submodule(name)
        key = ("lora_unet_" if model == "unet" else "lora_te_") + name.replace(".", "_")
        change = dense_weight(module) - before[name][0]
        assert rel_err(change, 0.7 * sd[f"{key}.diff"].reshape(change.shape)) <= 1e-5, name
        if before[name][1] is not None:
            assert rel_err(module.bias - before[name][1], 0.7 * sd[f"{key}.diff_b"]) <= 1e-5, name
    assert np.asarray(generate(pipe, steps=1)).std() > 5
    pipe.unload_loras()
    assert_same_state(pipe, state0)


# ---- OFT / BOFT and IA3 ----------------------------------------------------------------------------------------

def a1111_oft_updown(orig_weight, w: dict):
    """A1111's network_oft (extensions-builtin/Lora/network_oft.py, NetworkModuleOFT: its __init__'s block parameters
    and calc_updown) transcribed, einops and all, in float64: the change at multiplier 1 (its scale is 1.0)."""
    from einops import rearrange

    orig_weight, out_dim = orig_weight.double(), orig_weight.shape[0]
    is_R = "oft_diag" in w
    oft_blocks = (w["oft_diag"] if is_R else w["oft_blocks"]).double()
    alpha = None if is_R else w.get("alpha")
    dim = oft_blocks.shape[1] if is_R else oft_blocks.shape[0]
    is_boft = oft_blocks.dim() == 4
    rescale = w.get("rescale")
    if rescale is not None:
        rescale = rescale.double().reshape(-1, *[1] * (orig_weight.dim() - 1))
    num_blocks, block_size = dim, out_dim // dim
    constraint = (0 if alpha is None else float(alpha)) * out_dim
    if is_R:
        constraint, block_size, num_blocks = None, dim, out_dim // dim
    elif is_boft:
        boft_m, num_blocks, block_size = oft_blocks.shape[:3]
        boft_b = block_size
    eye = torch.eye(block_size, dtype=torch.float64)
    if not is_R:
        block_Q = oft_blocks - oft_blocks.transpose(-1, -2)
        if constraint != 0:
            norm_Q = torch.norm(block_Q.flatten())
            new_norm_Q = torch.clamp(norm_Q, max=constraint)
            block_Q = block_Q * ((new_norm_Q + 1e-8) / (norm_Q + 1e-8))
        oft_blocks = torch.matmul(eye + block_Q, (eye - block_Q).inverse())
    R = oft_blocks
    if not is_boft:
        merged_weight = rearrange(orig_weight, "(k n) ... -> k n ...", k=num_blocks, n=block_size)
        merged_weight = torch.einsum("k n m, k n ... -> k m ...", R, merged_weight)
        merged_weight = rearrange(merged_weight, "k m ... -> (k m) ...")
    else:
        m, b = boft_m, boft_b
        r_b = b // 2
        inp = orig_weight
        for i in range(m):
            bi = R[i]
            inp = rearrange(inp, "(c g k) ... -> (c k g) ...", g=2, k=2**i * r_b)
            inp = rearrange(inp, "(d b) ... -> d b ...", b=b)
            inp = torch.einsum("b i j, b j ... -> b i ...", bi, inp)
            inp = rearrange(inp, "d b ... -> (d b) ...")
            inp = rearrange(inp, "(c k g) ... -> (c g k) ...", g=2, k=2**i * r_b)
        merged_weight = inp
    if rescale is not None:
        merged_weight = rescale * merged_weight
    return merged_weight - orig_weight


OFT_TARGETS = ("input_blocks.1.1.transformer_blocks.0.attn1.to_q", "input_blocks.1.1.transformer_blocks.0.ff.net.2",
               "input_blocks.1.0.in_layers.2", "middle_block.1.proj_out")  # linears, a 3x3 and a 1x1 convolution


def _oft_tensors(variant: str, out: int, g: torch.Generator) -> dict:
    """One layer's tensors of `variant`: kohya's (oft_blocks, a constraint alpha that binds), LyCORIS' (oft_blocks,
    rescale, no alpha), the first LyCORIS files' (oft_diag: R itself, near an orthogonal matrix), BOFT (2 stages)."""
    if variant == "oft_diag":
        q = torch.randn(out // 8, 8, 8, generator=g) * 0.05
        return {"oft_diag": torch.linalg.matrix_exp(q - q.transpose(1, 2)) + 0.01 * torch.randn(q.shape, generator=g)}
    if variant == "boft":
        return {"oft_blocks": torch.randn(2, out // 4, 4, 4, generator=g) * 0.1, "alpha": torch.tensor(1.0),
                "rescale": 1 + 0.1 * torch.randn(out, *((1,) * 3), generator=g)}
    if variant == "kohya":
        return {"oft_blocks": torch.randn(4, out // 4, out // 4, generator=g) * 0.1, "alpha": torch.tensor(1e-3)}
    return {"oft_blocks": torch.randn(2, out // 2, out // 2, generator=g) * 0.05,
            "rescale": 1 + 0.1 * torch.randn(out, generator=g)}


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("variant", ["kohya", "lycoris", "oft_diag", "boft"])
def test_oft_merges_as_a1111(tmp_path, backend, variant, names):
    """OFT and BOFT files change each weight by weight * A1111's network_oft updown (its calc_updown transcribed,
    einops and all, above) on linears, a 3x3 and a 1x1 convolution: kohya's files (oft_unet_ + diffusers names, the
    constraint alpha binding), LyCORIS' (lora_unet_ + LDM names, rescale), the first LyCORIS files' oft_diag, BOFT;
    the image changes; unloading gives every weight back bit for bit."""
    from safetensors.torch import save_file

    pipe = tiny(backend)
    generate(pipe, steps=1)  # the cpu backend's weights packed
    state0, g, sd, want = state(pipe), torch.Generator().manual_seed(5), {}, {}
    for n in OFT_TARGETS:
        w = dense_weight(pipe.unet.get_submodule(n)).clone()
        tensors = _oft_tensors(variant, w.shape[0], g)
        key = f"oft_unet_{names[n]}" if variant == "kohya" else f"lora_unet_{n}"
        sd |= {f"{key.replace('.', '_')}.{k}": v for k, v in tensors.items()}
        want[n] = w, 0.7 * a1111_oft_updown(w, tensors)
    path = str(tmp_path / f"{variant}.safetensors")
    save_file(sd, path)
    plain = generate(pipe, steps=1)
    pipe.load_lora(path, 0.7)
    for n, (w, change) in want.items():
        assert change.abs().max() > 1e-3 * w.abs().max(), n  # (a change that shows)
        assert rel_err(dense_weight(pipe.unet.get_submodule(n)) - w, change) <= 1e-5, n
    assert not np.array_equal(generate(pipe, steps=1), plain)
    pipe.unload_loras()
    assert_same_state(pipe, state0)


def test_oft_constraint_as_a1111():
    """kohya's alpha bounds the norm of Q over the layer's blocks (A1111: constraint = alpha * rows): with a large
    alpha the blocks go in unscaled, with a small one the change is smaller but still A1111's."""
    from fastsd.lora import _oft_delta

    g = torch.Generator().manual_seed(1)
    w, blocks = torch.randn(32, 20, generator=g), torch.randn(4, 8, 8, generator=g) * 0.1
    free, bound = ({"oft_blocks": blocks, "alpha": torch.tensor(a)} for a in (10.0, 1e-3))
    for tensors in (free, bound, {"oft_blocks": blocks}):
        assert rel_err(_oft_delta(tensors, w), a1111_oft_updown(w, tensors)) <= 1e-5
    assert _oft_delta(bound, w).norm() < 0.5 * _oft_delta(free, w).norm()
    assert torch.equal(_oft_delta(free, w), _oft_delta({"oft_blocks": blocks}, w))


def a1111_ia3_updown(orig_weight, w, on_input):
    """A1111's network_ia3 calc_updown transcribed (finalize_updown: scale 1.0), in float64."""
    orig_weight, w = orig_weight.double(), w.double()
    if not on_input:
        w = w.reshape(-1, 1)
    return orig_weight * w


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_ia3_merges_as_a1111(tmp_path, backend):
    """LyCORIS IA3 (weight + on_input, kohya names, UNet and text encoder): each linear changes by weight * A1111's
    network_ia3 updown, w scaling output rows or (on_input) input columns; an alpha is not read (scale 1); the
    image changes; unloading gives every weight back bit for bit."""
    from safetensors.torch import save_file

    pipe = tiny(backend)
    generate(pipe, steps=1)
    state0, g, sd, want = state(pipe), torch.Generator().manual_seed(6), {}, {}
    targets = {("unet", "input_blocks.1.1.transformer_blocks.0.attn2.to_k"): False,
               ("unet", "input_blocks.1.1.transformer_blocks.0.attn1.to_v"): False,
               ("unet", "input_blocks.1.1.transformer_blocks.0.ff.net.2"): True,
               ("clip", "text_model.encoder.layers.0.mlp.fc1"): False}
    for (model, n), on_input in targets.items():
        w = dense_weight(getattr(pipe, model).get_submodule(n)).clone()
        v = torch.randn(w.shape[1 if on_input else 0], generator=g) * 0.5
        key = ("lora_unet_" if model == "unet" else "lora_te_") + n.replace(".", "_")
        sd |= {f"{key}.weight": v, f"{key}.on_input": torch.tensor(int(on_input)), f"{key}.alpha": torch.tensor(4.0)}
        want[model, n] = w, 0.7 * a1111_ia3_updown(w, v, on_input)
    path = str(tmp_path / "ia3.safetensors")
    save_file(sd, path)
    plain = generate(pipe, steps=1)
    pipe.load_lora(path, 0.7)
    for (model, n), (w, change) in want.items():
        assert rel_err(dense_weight(getattr(pipe, model).get_submodule(n)) - w, change) <= 1e-5, n
    assert not np.array_equal(generate(pipe, steps=1), plain)
    pipe.unload_loras()
    assert_same_state(pipe, state0)


def test_weight_changes_follow_earlier_files(tmp_path):
    """OFT reads the weight it changes: after a LoRA on the same layer it turns the LoRA's merged weight (A1111 merges
    its networks one after another on the current weight), in either order of loading, one file at a time or both
    in one load."""
    from safetensors.torch import save_file

    pipe = tiny()
    n = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    w0 = pipe.unet.get_submodule(n).weight.detach().clone()
    g = torch.Generator().manual_seed(2)
    down, up = torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g) * 0.05
    oft = {"oft_blocks": torch.randn(4, 8, 8, generator=g) * 0.1}
    key = "lora_unet_" + n.replace(".", "_")
    lora, oft_path = str(tmp_path / "l.safetensors"), str(tmp_path / "o.safetensors")
    save_file({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}, lora)
    save_file({f"{key}.{k}": v for k, v in oft.items()}, oft_path)
    lora_first = w0.double() + up.double() @ down.double()
    lora_first = lora_first + a1111_oft_updown(lora_first, oft)
    oft_first = w0.double() + a1111_oft_updown(w0, oft) + up.double() @ down.double()
    for order, want in (((lora, oft_path), lora_first), ((oft_path, lora), oft_first)):
        for together in (False, True):
            if together:
                pipe.load_loras([(p, 1.0) for p in order])
            else:
                for p in order:
                    pipe.load_lora(p)
            assert rel_err(pipe.unet.get_submodule(n).weight, want) <= 1e-5, (order, together)
            pipe.unload_loras()
    assert torch.equal(pipe.unet.get_submodule(n).weight, w0)


def a1111_dora(w, updown, dora_scale, multiplier):
    """A1111's DoRA merge (extensions-builtin/Lora/network.py: finalize_updown, apply_weight_decompose) transcribed, in
    float64: the change it adds to w. A1111 reads LyCORIS' (1, in, ...) dora_scale (norm per input column); for an
    (out, 1, ...) one (LyCORIS' wd_on_out, which A1111 has no branch for) the norm runs per output row, as LyCORIS'."""
    w, updown, dora_scale = w.double(), updown.double(), dora_scale.double()
    merged_scale1 = updown + w
    if dora_scale.shape[0] == 1:
        merged_scale1_norm = (merged_scale1.transpose(0, 1).reshape(merged_scale1.shape[1], -1)
                              .norm(dim=1, keepdim=True).reshape(merged_scale1.shape[1], *[1] * (w.dim() - 1))
                              .transpose(0, 1))
    else:
        merged_scale1_norm = merged_scale1.reshape(w.shape[0], -1).norm(dim=1).reshape(w.shape[0], *[1] * (w.dim() - 1))
    dora_merged = merged_scale1 * (dora_scale / merged_scale1_norm)
    final_updown = dora_merged - w
    return final_updown * multiplier


@pytest.mark.parametrize("form", ["columns", "rows"])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_kohya_dora_merges_as_a1111(tmp_path, backend, form):
    """kohya / LyCORIS dora_scale on every UNet and text encoder layer (LoCon, linears, 1x1 convolutions) and on a
    LoHa, (1, in, ...) and (out, 1, ...): the merge's change is A1111's at weight 0.7 (the weight applied to the
    decomposed change); unloading restores the bits."""
    from safetensors.torch import load_file, save_file

    pipe = tiny(backend)
    generate(pipe, steps=1)  # the cpu backend's weights packed
    state0 = state(pipe)
    path = str(tmp_path / "dora.safetensors")
    write_random_lora(path, pipe, fmt="kohya_ldm", rank=4, alpha=2.0, dora=form, seed=6)
    sd = load_file(path)
    loha = "input_blocks.1.0.in_layers.2"
    key = "lora_unet_" + loha.replace(".", "_")
    part, want = _lycoris(pipe, "loha", [("unet", loha)], torch.Generator().manual_seed(7))
    sd = {k: v for k, v in sd.items() if not k.startswith(key + ".lora_")} | part
    save_file(sd, path)
    before = {(m, n): dense_weight(getattr(pipe, m).get_submodule(n)).clone()
              for m in ("unet", "clip") for n in layers_of(getattr(pipe, m))}
    pipe.load_lora(path, 0.7)
    for (model, name), w in before.items():
        key = ("lora_unet_" if model == "unet" else "lora_te_") + name.replace(".", "_")
        updown = (want[(model, name)] if name == loha else
                  (sd[f"{key}.lora_up.weight"].flatten(1) @ sd[f"{key}.lora_down.weight"].flatten(1)).reshape(w.shape)
                  * 2.0 / 4)
        assert sd[f"{key}.dora_scale"].shape[0 if form == "columns" else 1] == 1
        change = dense_weight(getattr(pipe, model).get_submodule(name)) - w
        assert rel_err(change, a1111_dora(w, updown, sd[f"{key}.dora_scale"], 0.7)) <= 1e-5, name
    pipe.unload_loras()
    assert_same_state(pipe, state0)


@pytest.mark.parametrize("kind,rank,alpha,weight", [("dora", 8, None, 0.7), ("dora", 8, 16.0, 1.3),
                                                    ("bias", 4, None, 0.8), ("bias", 8, 4.0, 0.6)])
def test_peft_dora_and_lora_bias_match_diffusers_fuse(tmp_path, names, base_image, kind, rank, alpha, weight):
    """PEFT's DoRA (lora_magnitude_vector: (out,) for linears, (1, out, 1, 1) for convolutions) on every UNet layer,
    and PEFT's lora_bias (lora_B.bias) on every UNet and text encoder layer that has a bias, against diffusers'
    load_lora_weights + fuse_lora (weights and biases within 1e-5, images >= 40 dB). DoRA's text encoder is left out:
    diffusers (0.42, transformers 5) does not load the magnitudes of a text encoder (its load report lists them as
    UNEXPECTED `...lora_magnitude_vector.default_0` and MISSING `...default_0.weight`) and fuses PEFT's initial ones;
    test_peft_dora_on_the_text_encoder holds fastsd's to PEFT's formula."""
    pipe, ref = tiny(), tiny()
    layers = [n for n in layers_of(pipe.unet) if kind == "dora" or pipe.unet.get_submodule(n).bias is not None]
    path = str(tmp_path / f"{kind}.safetensors")
    write_random_lora(path, pipe, fmt="peft", rank=rank, alpha=alpha, layers=layers, names=names, seed=rank,
                      text_encoder=kind == "bias", **({"dora": "peft"} if kind == "dora" else {"bias": True}))
    sp = diffusers_pipeline(ref)
    fuse_in_diffusers(sp, path, weight, False)
    before = state(pipe)
    pipe.load_lora(path, weight)
    after = assert_matches_diffusers(pipe, sp, names)
    assert psnr(after, base_image) < 35, "the LoRA should change the image"
    moved = {k.rpartition(".")[2] for k, v in state(pipe).items() if not torch.equal(v, before[k])}
    assert moved == ({"weight", "bias"} if kind == "bias" else {"weight"})
    pipe.unload_loras()
    assert_same_state(pipe, before)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_peft_dora_and_lora_bias_on_the_text_encoder(tmp_path, names, backend):
    """PEFT's formulas on the text encoder (where diffusers is no oracle for DoRA, see above), the packed cpu path
    included: W' = m / ||W + w * scale * B @ A||_row * (W + w * scale * B @ A) (the weight w inside the norm, as
    diffusers' fuse_lora(lora_scale=w)), b' = b + w * scale * lora_B.bias; unloading restores the bits."""
    from safetensors.torch import load_file

    pipe = tiny(backend)
    generate(pipe, steps=1)  # the cpu backend's weights packed
    state0 = state(pipe)
    before = {n: (dense_weight(m).clone(), m.bias.clone())
              for n in layers_of(pipe.clip) for m in [pipe.clip.get_submodule(n)]}
    for kind in ("dora", "bias"):
        path = str(tmp_path / f"{kind}.safetensors")
        write_random_lora(path, pipe, fmt="peft", rank=4, alpha=8.0, layers=[], names=names, seed=2,
                          **({"dora": "peft"} if kind == "dora" else {"bias": True}))
        sd = load_file(path)
        pipe.load_lora(path, 0.7)
        for n in layers_of(pipe.clip):
            key, (w, b) = "text_encoder." + n, before[n]
            v = w.double() + 0.7 * 2.0 * sd[f"{key}.lora_B.weight"].double() @ sd[f"{key}.lora_A.weight"].double()
            module = pipe.clip.get_submodule(n)
            if kind == "dora":
                want = v * (sd[f"{key}.lora_magnitude_vector"].double() / v.norm(dim=1))[:, None]
                assert rel_err(dense_weight(module) - w, want - w) <= 1e-5, n
            else:
                assert rel_err(dense_weight(module) - w, v - w) <= 1e-5, n
                assert rel_err(module.bias - b, 0.7 * 2.0 * sd[f"{key}.lora_B.bias"]) <= 1e-5, n
        pipe.unload_loras()
        assert_same_state(pipe, state0)


# ---- prompt syntax, folder, infotext -------------------------------------------------------------------

def test_parse_prompt():
    assert parse_prompt("a cat <lora:style:0.8>, <lora:b> <lyco:c:-1>") == ("a cat ,  ", [("style", 0.8), ("b", 1.0),
                                                                                       ("c", -1.0)])
    assert parse_prompt("no tags (x:1.2)") == ("no tags (x:1.2)", [])
    # A1111's <lora:NAME:TE:UNET> and te= / unet=: the UNet's weight defaults to the text encoder's
    assert parse_prompt("<lora:a:1:0.5> <lora:b:0.7:0.7> <lora:c:unet=0.25> <lora:d:te=0.5:unet=2> <lora:e:0.3:te=1>")[1] \
        == [("a", (1.0, 0.5)), ("b", 0.7), ("c", (1.0, 0.25)), ("d", (0.5, 2.0)), ("e", 1.0)]
    for bad, match in (("<lora:a:b>", "not a number"), ("<lora:a:1:x>", "not a number"), ("<hypernet:a:1>", "not"),
                       ("<lora:a:inf>", "finite"), ("<lora:a:foo=1>", "expected"), ("<lora:a:1:1:8>", "dyn"),
                       ("<lora:a:dyn=8>", "dyn"), ("<lora:a:unet=nan>", "finite"), ("<lora::1>", "expected"),
                       ("<lora:a:1e308>", "within -1000 to 1000"), ("<lora:a:0:1e30>", "within"),
                       ("<lora:a:1e400>", "finite")):
        with pytest.raises(ValueError, match=match):
            parse_prompt(bad)
    assert parse_lora_arg("x.safetensors:0.5") == ("x.safetensors", 0.5)
    assert parse_lora_arg("C:/l/x.safetensors") == ("C:/l/x.safetensors", 1.0)
    assert parse_lora_arg("x.safetensors") == ("x.safetensors", 1.0)
    assert parse_lora_arg("x.safetensors:-1000") == ("x.safetensors", -1000.0)
    with pytest.raises(ValueError, match="within -1000 to 1000"):
        parse_lora_arg("x.safetensors:1e308")


def test_lora_names_stay_in_their_folder(tmp_path):
    d = tmp_path / "loras"
    d.mkdir()
    (d / "style.safetensors").write_bytes(b"")
    (d / "old.pt").write_bytes(b"")
    (tmp_path / "secret.safetensors").write_bytes(b"")
    assert lora_path("style", str(d)) == str(d / "style.safetensors")
    assert list_loras(str(d)) == {"style": str(d / "style.safetensors"), "old": str(d / "old.pt")}
    for name in ("../secret", str(tmp_path / "secret"), "..", "sub/style", "a\\b"):
        with pytest.raises(ValueError, match="without a path"):
            lora_path(name, str(d))
    with pytest.raises(ValueError, match="it has: old, style"):
        lora_path("nope", str(d))
    with pytest.raises(ValueError, match="--lora-dir"):
        lora_path("style", None)
    with pytest.raises(ValueError, match="style.safetensors: not a folder"):
        lora_path("style", str(d / "style.safetensors"))
    with pytest.raises(ValueError, match="no such folder"):
        lora_path("style", str(tmp_path / "missing"))


def addnet_hash(path):
    """A1111's LoRA hash, computed here independently: sha256 of the bytes after the safetensors header."""
    data = open(path, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + n:]).hexdigest()[:12]


def test_prompt_tags_infotext_and_encoding(tmp_path):
    pipe = tiny()
    path = str(tmp_path / "my,style.safetensors")
    write_random_lora(path, pipe, fmt="kohya_ldm", rank=4, seed=4)
    with pytest.raises(ValueError, match="not loaded"):
        pipe.generate("a cat <lora:my,style:0.5>", steps=1, width=32, height=32, progress=False)
    pipe.load_lora(path, 0.5)
    cond = pipe.encode_prompt(["a cat <lora:my,style:0.5>"], [""])[0]
    assert torch.equal(cond, pipe.encode_prompt(["a cat"], [""])[0])  # the tag never reaches the text encoder
    im = pipe.generate("a cat <lora:my,style:0.5>", steps=1, width=32, height=32, seed=1, progress=False)[0]
    prompt, _, params = parse_infotext(im.info["parameters"])
    assert prompt == "a cat <lora:my,style:0.5>"
    assert params["Lora hashes"] == f"mystyle: {addnet_hash(path)}"  # A1111 drops ':' and ',' from the name
    # a LoRA loaded without a tag is recorded with one, so the infotext makes the same image again
    im = pipe.generate("a cat", steps=1, width=32, height=32, seed=1, progress=False)[0]
    assert parse_infotext(im.info["parameters"])[0] == "a cat <lora:my,style:0.5>"


def test_text_encoder_and_unet_weights_apart(tmp_path):
    """(TE, UNET) as A1111's <lora:NAME:TE:UNET>: each model gets its own multiplier; the infotext writes the pair."""
    path = str(tmp_path / "style.safetensors")
    merged = {}
    for weight in (0.5, 1.5, (0.5, 1.5), (1.0, 0.0)):
        pipe = tiny()
        if not merged:
            write_random_lora(path, pipe, fmt="kohya_ldm", rank=4, seed=5)
            merged["none"] = state(pipe)
        pipe.load_lora(path, weight)
        merged[weight] = state(pipe)
    unet_keys = set(pipe.unet.state_dict())
    assert not unet_keys & set(pipe.clip.state_dict())  # state() keys name one model each
    for k, v in merged[(0.5, 1.5)].items():
        assert torch.equal(v, (merged[1.5] if k in unet_keys else merged[0.5])[k]), k
    changed = [k for k in merged["none"] if not torch.equal(merged[(1.0, 0.0)][k], merged["none"][k])]
    assert changed and not unet_keys & set(changed)  # UNet weight 0: only the text encoder moved
    im = pipe.generate("a cat", steps=1, width=32, height=32, seed=1, progress=False)[0]
    assert parse_infotext(im.info["parameters"])[0] == "a cat <lora:style:1:0>"
    pipe.generate("a cat <lora:style:1:0>", steps=1, width=32, height=32, seed=1, progress=False)  # loaded so: runs
    with pytest.raises(ValueError, match="not loaded"):
        pipe.generate("a cat <lora:style:1>", steps=1, width=32, height=32, progress=False)


@pytest.mark.slow
def test_sd15_size_lora_matches_diffusers(tmp_path):
    """SD1.5's architecture: a kohya (diffusers names) rank-32 LoRA with alpha on every UNet layer (LoCon on
    the 3x3 convolutions) and the text encoder; 128 px, 4 steps."""
    pipe, ref = tiny(preset="sd15"), tiny(preset="sd15")
    names = diffusers_names(ref)
    path = str(tmp_path / "sd15.safetensors")
    write_random_lora(path, pipe, fmt="kohya_diffusers", rank=32, alpha=16.0, names=names, strength=0.1)
    sp = diffusers_pipeline(ref)
    fuse_in_diffusers(sp, path, 0.8, False)
    pipe.load_lora(path, 0.8)
    assert_matches_diffusers(pipe, sp, names, image_size=128, steps=4)


# ---- command line --------------------------------------------------------------------------------------

CLI = ["--model", "random:tiny", "--steps", "2", "--width", "32", "--height", "32", "--no-progress", "--seed", "5"]


def test_cli_lora_file_and_prompt_tag(tmp_path, capsys, monkeypatch):
    from fastsd.generate import main
    from PIL import Image

    loras = tmp_path / "loras"
    loras.mkdir()
    pipe = tiny()
    write_random_lora(str(loras / "ink.safetensors"), pipe, fmt="kohya_ldm", rank=4, seed=1)
    write_random_lora(str(tmp_path / "extra.safetensors"), pipe, fmt="kohya_ldm", rank=4, seed=2)
    monkeypatch.setenv("FASTSD_LORA_DIR", str(loras))
    out = tmp_path / "a.png"
    assert main(["a cat <lora:ink:0.7>", *CLI, "--lora", f"{tmp_path / 'extra.safetensors'}:0.4",
                 "--out", str(out)]) == 0
    with Image.open(out) as im:
        prompt, _, params = parse_infotext(im.text["parameters"])
        with_loras = np.asarray(im.convert("RGB"))
    assert prompt == "a cat <lora:ink:0.7> <lora:extra:0.4>"
    assert params["Lora hashes"] == (f"extra: {addnet_hash(str(tmp_path / 'extra.safetensors'))}, "
                                     f"ink: {addnet_hash(str(loras / 'ink.safetensors'))}")  # load order
    assert main(["a cat", *CLI, "--out", str(tmp_path / "b.png")]) == 0
    with Image.open(tmp_path / "b.png") as im:
        assert psnr(np.asarray(im.convert("RGB")), with_loras) < 35


def test_lora_found_by_its_a1111_alias(tmp_path, capsys):
    """A1111 finds <lora:NAME> by file stem, else by the one file whose alias it is (kohya's ss_output_name in the
    file's metadata; a file without one is its own alias): the image is the stem tag's, the infotext keeps the tag
    as written (not a second tag of the stem) and names the hash by it; a stem wins over another file's alias; an
    alias of two files is refused naming them (exit 2, one line, nothing written)."""
    import shutil

    from fastsd.generate import main
    from fastsd.lora import lora_by_name, list_loras, lora_alias, lora_metadata
    from fastsd.testing_lora import set_metadata
    from PIL import Image

    loras = tmp_path / "loras"
    loras.mkdir()
    pipe = tiny()
    ink = str(loras / "ink_v2.safetensors")
    write_random_lora(ink, pipe, fmt="kohya_ldm", rank=4, seed=1)
    set_metadata(ink, {"ss_output_name": "ink", "ss_tag_frequency": '{"set": {"cat": 2}}'})
    write_random_lora(str(loras / "plain.safetensors"), pipe, fmt="kohya_ldm", rank=4, seed=2)
    have = list_loras(str(loras))
    assert lora_alias(have["ink_v2"]) == "ink" and lora_alias(have["plain"]) == "plain"
    assert lora_metadata(have["ink_v2"])["ss_tag_frequency"] == {"set": {"cat": 2}}  # a JSON object parsed (A1111)
    assert lora_by_name("ink", have) == lora_by_name("ink_v2", have) == ink and lora_by_name("nope", have) is None
    pngs = {}
    for tag in ("ink", "ink_v2"):
        out = tmp_path / f"{tag}.png"
        assert main([f"a cat <lora:{tag}:0.7>", *CLI, "--lora-dir", str(loras), "--out", str(out)]) == 0
        with Image.open(out) as im:
            prompt, _, params = parse_infotext(im.text["parameters"])
            pngs[tag] = np.asarray(im.convert("RGB"))
        assert prompt == f"a cat <lora:{tag}:0.7>" and params["Lora hashes"] == f"{tag}: {addnet_hash(ink)}"
    assert np.array_equal(pngs["ink"], pngs["ink_v2"])
    pipe.load_loras([(ink, 0.5, "ink")])  # Python: the name prompt tags use, given with the file
    assert parse_infotext(pipe.generate("a cat <lora:ink:0.5>", steps=1, width=32, height=32, seed=1,
                                        progress=False)[0].info["parameters"])[0] == "a cat <lora:ink:0.5>"
    write_random_lora(str(loras / "ink.safetensors"), pipe, fmt="kohya_ldm", rank=4, seed=3)
    assert lora_by_name("ink", list_loras(str(loras))) == str(loras / "ink.safetensors")  # the stem wins
    (loras / "ink.safetensors").unlink()
    shutil.copy(ink, loras / "ink_v3.safetensors")
    with pytest.raises(ValueError, match=r"the alias \(ss_output_name\) of 2 LoRA files \(ink_v2, ink_v3\)"):
        lora_by_name("ink", list_loras(str(loras)))
    out = tmp_path / "two.png"
    capsys.readouterr()
    assert main(["a cat <lora:ink:0.7>", *CLI, "--lora-dir", str(loras), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: <lora:ink>: the alias") and not out.exists(), err


@pytest.mark.parametrize("prompt,args,match", [
    ("a cat <lora:../ink:1>", [], "without a path"),
    ("a cat <lora:nope:1>", [], "no nope.safetensors"),
    ("a cat <lora:ink:x>", [], "not a number"),
    ("a cat", ["--lora", "missing.safetensors:0.5"], "no such file"),
    ("a cat", ["--lora", "{loras}"], "a folder, not a LoRA file"),
    ("a cat", ["--lora", "{bad}"], "do not fit this model"),
    ("a cat", ["--lora", "{loras}/ink.safetensors:1e308"], "within -1000 to 1000"),
    ("a cat", ["--lora", "{huge}:1000"], "weights out of"),
    ("a cat", ["--lora", "{loras}/ink.safetensors:abc"], "the weight 'abc' is not a number"),
    ("a cat", ["--lora", "{loras}/ink.safetensors:0.5:1"], "one weight after the file"),
])
def test_cli_bad_lora_one_line_exit_2(tmp_path, capsys, monkeypatch, prompt, args, match):
    from fastsd.generate import main

    loras = tmp_path / "loras"
    loras.mkdir()
    pipe = tiny()
    write_random_lora(str(loras / "ink.safetensors"), pipe, fmt="kohya_ldm", rank=4)
    _kohya(pipe, str(tmp_path / "bad.safetensors"), BAD["shape"][0])
    _kohya(pipe, str(tmp_path / "huge.safetensors"), _huge_pair())
    args = [a.format(bad=tmp_path / "bad.safetensors", loras=loras, huge=tmp_path / "huge.safetensors") for a in args]
    out = tmp_path / "out"
    code = main([prompt, *CLI, "--lora-dir", str(loras), *args, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: ") and match in err[-1], err
    assert not [line for line in err if "Traceback" in line]
    assert not out.exists() or not any(out.iterdir())


def test_benchmark_script_runs(tmp_path, capsys):
    """python -m fastsd.benchmarks.lora at tiny size (a smoke run: its numbers are not checked)."""
    import json

    from fastsd.benchmarks.lora import main

    out = tmp_path / "lora.jsonl"
    main(["--model", "random:tiny", "--res", "64", "--repeat", "2", "--threads", "1", "--json", str(out)])
    row = json.loads(out.read_text())
    assert row["layers"] > 0 and len(row["load_s"]) == 2 and len(row["switch_s"]) == 2 and row["isa"]
    assert row["originals_kept_bytes"] > 0 and row["unet_first_call_after_switch_s"] > 0
    assert len(row["switch_after_run_s"]) == 2 and row["set"] == 1
    assert "load + merge" in capsys.readouterr().out
    main(["--model", "random:tiny", "--res", "0", "--repeat", "1", "--threads", "1", "--set", "2", "--json", str(out)])
    row = json.loads(out.read_text().splitlines()[-1])
    assert row["set"] == 2 and len(row["load_s"]) == 1 and "sets of 2" in capsys.readouterr().out


@pytest.mark.parametrize("fmt_in", ["contiguous", "channels_last"])
@pytest.mark.parametrize("fmt_out", ["contiguous", "channels_last"])
def test_conv_merge_reads_and_writes_either_layout(fmt_in, fmt_out):
    """A channels_last weight (the CPU path's layout) is merged in its own memory order without a layout copy:
    the same values as the plain formula, for LoCon's (r, in, 3, 3) down and (out, r, 1, 1) up."""
    from fastsd.lora import LoraLayer, merged_weight

    fmt = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 16, 3, 3, generator=g).contiguous(memory_format=fmt[fmt_in])
    layer = LoraLayer("unet", "m", "k", torch.randn(4, 16, 3, 3, generator=g), torch.randn(24, 4, 1, 1, generator=g), 0.5)
    want = w + 0.8 * 0.5 * (layer.up.reshape(24, -1) @ layer.down.reshape(4, -1)).reshape(24, 16, 3, 3)
    out = merged_weight(w, layer, 0.8, fmt[fmt_out])
    assert out.is_contiguous(memory_format=fmt[fmt_out])
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("form", ["rows", "columns"])
def test_dora_whose_change_cancels_the_weight_says_so(tmp_path, form):
    """A DoRA layer whose changed weight has a zero row / column: no magnitude can scale it at any weight, so the
    error says what the file does instead of 'try a lower weight'; nothing is changed."""
    from safetensors.torch import save_file

    pipe = tiny("torch")
    module = pipe.unet.get_submodule("input_blocks.1.1.transformer_blocks.0.attn1.to_q")
    w = module.weight.detach().float()
    scale = torch.ones(w.shape[0], 1) if form == "rows" else torch.ones(1, w.shape[1])
    path = str(tmp_path / "cancel.safetensors")
    save_file({f"{TO_Q}.diff": -w.contiguous(), f"{TO_Q}.dora_scale": scale}, path)
    state0 = state(pipe)
    for weight in (0.3, 1.0):
        with pytest.raises(ValueError, match="norm 0") as e:
            pipe.load_lora(path, weight)
        assert "try a lower weight" not in str(e.value) and "cancels the layer's weight" in str(e.value)
        assert_same_state(pipe, state0)
