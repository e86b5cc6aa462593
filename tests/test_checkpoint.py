"""Checkpoint sources and layouts, strictness, and bad input (each a one-line CheckpointError)."""
import os
import pickle
import shutil

import pytest
import safetensors.torch
import torch
from oracles import save_diffusers_folder

from fastsd import CheckpointError, load_pipeline
from fastsd.checkpoint import from_diffusers_folder, ldm_state_dict
from fastsd.config import TINY


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A TINY diffusers folder and its LDM state dict."""
    root = tmp_path_factory.mktemp("tiny")
    save_diffusers_folder(TINY, root / "diffusers")
    return root / "diffusers", ldm_state_dict(from_diffusers_folder(str(root / "diffusers")))


def _params(pipe):
    return {f"{m}.{k}": v for m in ("clip", "vae", "unet") for k, v in getattr(pipe, m).state_dict().items()}


@pytest.fixture(scope="module")
def reference(tiny):
    return _params(load_pipeline(str(tiny[0]), device="cpu", dtype="fp32"))


def _one_line_error(source, match, **kw):
    with pytest.raises(CheckpointError, match=match) as e:
        load_pipeline(str(source), device="cpu", **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_ckpt_a1111_style_file(tiny, reference, tmp_path):
    """fp16 .ckpt with a state_dict wrapper, EMA copies, schedule buffers, position_ids and the old
    CLIP prefix without text_model.: loads the main (non-EMA) weights, upcast."""
    _, sd = tiny
    full = {}
    for k, v in sd.items():
        k = k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer.")
        full[k] = v.half()
        if k.startswith("model.diffusion_model."):  # EMA copy, LDM's flattened naming; must be ignored
            full["model_ema." + k[len("model."):].replace(".", "")] = torch.zeros_like(v).half()
    full["cond_stage_model.transformer.embeddings.position_ids"] = torch.arange(77)[None]
    full["alphas_cumprod"] = torch.linspace(0.99, 0.01, 1000)
    full["betas"] = torch.linspace(1e-4, 0.02, 1000)
    full["model_ema.decay"] = torch.tensor(0.9999)
    path = tmp_path / "a1111.ckpt"
    torch.save({"state_dict": full, "global_step": 1000}, path)
    got = _params(load_pipeline(str(path), device="cpu", dtype="fp32"))
    assert got.keys() == reference.keys()
    for k, v in reference.items():
        assert torch.equal(got[k], v.half().float()), k


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_safetensors_ldm_file_in_low_precision(tiny, reference, tmp_path, dtype):
    _, sd = tiny
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file({k: v.half() for k, v in sd.items()}, str(path))
    pipe = load_pipeline(str(path), device="cpu", dtype=dtype)
    got = _params(pipe)
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    for k, v in reference.items():
        assert got[k].dtype == torch_dtype
        assert torch.equal(got[k], v.half().to(torch_dtype)), k


def test_bare_ckpt_without_wrapper(tiny, reference, tmp_path):
    path = tmp_path / "bare.ckpt"
    torch.save(tiny[1], path)
    got = _params(load_pipeline(str(path), device="cpu", dtype="fp32"))
    assert all(torch.equal(got[k], v) for k, v in reference.items())


def test_diffusers_folder_with_bin_weights(tmp_path):
    save_diffusers_folder(TINY, tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "unet" / "diffusion_pytorch_model.bin").exists()
    pipe = load_pipeline(str(tmp_path / "bin"), device="cpu", dtype="fp32")
    assert pipe.config.unet == TINY.unet


def test_repo_id_from_local_hf_cache(tiny, reference, tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "models--someone--tiny-sd"
    shutil.copytree(tiny[0], repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    got = _params(load_pipeline("someone/tiny-sd", device="cpu", dtype="fp32"))
    assert all(torch.equal(got[k], v) for k, v in reference.items())
    _one_line_error("someone/other-model", "no such repo in the local Hugging Face cache")


def test_random_presets():
    pipe = load_pipeline("random:tiny", device="cpu", dtype="fp32")
    assert pipe.config == TINY and pipe.kind == "sd1"
    assert load_pipeline("random:tiny-inpainting", device="cpu").kind == "sd1-inpainting"
    _one_line_error("random:sd99", "unknown preset 'sd99'.*random:sd15")


# ---- strictness ------------------------------------------------------------------------------------

def test_missing_unexpected_and_wrong_shape_keys_are_named(tiny, tmp_path):
    sd = dict(tiny[1])
    del sd["model.diffusion_model.out.2.bias"]
    sd["model.diffusion_model.extra.weight"] = torch.zeros(3)
    sd["first_stage_model.quant_conv.weight"] = torch.zeros(8, 8, 3, 3)
    path = tmp_path / "broken.safetensors"
    safetensors.torch.save_file(sd, str(path))
    msg = _one_line_error(path, "unet weights do not fit")
    assert "1 missing (out.2.bias)" in msg and "1 unexpected (extra.weight)" in msg
    sd = dict(tiny[1])
    sd["first_stage_model.quant_conv.weight"] = torch.zeros(8, 8, 3, 3)
    safetensors.torch.save_file(sd, str(path))
    _one_line_error(path, r"vae weights do not fit.*quant_conv.weight \(8, 8, 3, 3\) vs \(8, 8, 1, 1\)")
    sd = dict(tiny[1])
    sd["some_other_model.weight"] = torch.zeros(2)
    safetensors.torch.save_file(sd, str(path))
    _one_line_error(path, "unexpected keys outside the SD1.x models: some_other_model.weight")


# ---- bad input ---------------------------------------------------------------------------------------

def test_missing_path(tmp_path):
    _one_line_error(tmp_path / "nope.safetensors", "no such file or folder")


def test_truncated_safetensors(tiny, tmp_path):
    path = tmp_path / "cut.safetensors"
    safetensors.torch.save_file(tiny[1], str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _one_line_error(path, "truncated")
    path.write_bytes(data[:5])
    _one_line_error(path, "not a safetensors file")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_ckpt_whose_pickle_would_run_code_is_refused_unrun(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"x": _RunsCode(marker)}}, f)
    _one_line_error(path, "refused to load")
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _RunsCode(marker)}, path)  # zip format too
    _one_line_error(path, "refused to load")
    assert not marker.exists()


@pytest.mark.parametrize("key, family", [
    ("conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight", "SDXL"),
    ("cond_stage_model.model.token_embedding.weight", "Stable Diffusion 2.x"),
    ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", "LoRA"),
    ("decoder.up.0.block.0.conv1.weight", "standalone VAE"),
])
def test_other_model_families_are_named(tmp_path, key, family):
    path = tmp_path / "other.safetensors"
    safetensors.torch.save_file({key: torch.zeros(2, 2), "model.diffusion_model.input_blocks.0.0.weight":
                                 torch.zeros(4, 4, 3, 3)}, str(path))
    _one_line_error(path, f"this is .*{family}.*Stable Diffusion 1.x checkpoints only")


def test_unrelated_file(tmp_path):
    path = tmp_path / "resnet.safetensors"
    safetensors.torch.save_file({"fc.weight": torch.zeros(2, 2)}, str(path))
    _one_line_error(path, "not a Stable Diffusion checkpoint.*fc.weight")


def test_diffusers_folder_missing_unet(tiny, tmp_path):
    shutil.copytree(tiny[0], tmp_path / "f")
    shutil.rmtree(tmp_path / "f" / "unet")
    _one_line_error(tmp_path / "f", r"not a complete diffusers folder \(missing unet/\)")


def test_sd2_style_diffusers_folder(tiny, tmp_path):
    import json

    shutil.copytree(tiny[0], tmp_path / "f")
    cfg_path = tmp_path / "f" / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(use_linear_projection=True, attention_head_dim=[5, 10])
    cfg_path.write_text(json.dumps(cfg))
    _one_line_error(tmp_path / "f", "not an SD1.x model: its UNet uses linear projections")


@pytest.mark.parametrize("part,content,match", [
    ("unet", "{}", r"unet/config.json: not a Stable Diffusion 1.x config \(no 'block_out_channels'\)"),
    ("vae", "[1, 2]", r"vae/config.json: not a Stable Diffusion 1.x config \(a JSON list"),
    ("text_encoder", "{\"hidden_size\": \"wide\"}", r'text_encoder/config.json: hidden_size "wide"; expected a positive'),
    ("unet", "[" * 100000, r"unet/config.json: not valid JSON"),
    ("vae", '{"block_out_channels": [32, 64], "norm_num_groups": 0}', r"vae/config.json: norm_num_groups 0"),
])
def test_diffusers_folder_with_a_broken_config(tiny, tmp_path, part, content, match):
    shutil.copytree(tiny[0], tmp_path / "f")
    (tmp_path / "f" / part / "config.json").write_text(content)
    _one_line_error(tmp_path / "f", match)


def test_text_file_named_ckpt_is_not_called_a_pickle(tmp_path):
    path = tmp_path / "notes.ckpt"
    path.write_text("these are my notes, not a model\n")
    err = _one_line_error(path, "not a torch checkpoint \\(neither a zip archive nor a pickle\\)")
    assert "weights_only" not in err and "False" not in err  # no advice to load unsafely


def test_unsupported_devices_are_refused_before_loading():
    from fastsd import load_pipeline

    for device in ("mps", "meta", "xla", "nonsense"):
        with pytest.raises(ValueError, match="device"):
            load_pipeline("random:tiny", device=device)


def test_loading_a_file_imports_no_compiler(tiny, tmp_path):
    """Models are built on the meta device and filled from the file: no weight is initialised first (an
    embedding's normal_ on meta imported torch._dynamo, 1-2 s of every load)."""
    import subprocess
    import sys

    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file(tiny[1], str(path))
    code = ("import sys, fastsd; p = fastsd.load_pipeline(sys.argv[1], device='cpu', dtype='fp32'); "
            "print('torch._dynamo' in sys.modules, float(p.clip.text_model.embeddings.token_embedding.weight.abs().sum()))")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300,
                         check=True).stdout.split()
    assert out[0] == "False" and float(out[1]) > 0  # (and the embedding is the file's, not left empty)


def test_weights_are_read_straight_into_their_dtype(tmp_path, monkeypatch):
    """TensorRef.load_into: the file's bytes into the weight itself, or through a small per-thread scratch
    converted a chunk at a time (several chunks and a ragged last one here): the bits of load().to(dtype); two
    threads at once don't share a scratch; a file cut short after its header was read is one CheckpointError."""
    import threading

    from fastsd import tensorfile

    monkeypatch.setattr(tensorfile, "CHUNK_BYTES", 1000)
    g = torch.Generator().manual_seed(0)
    tensors = {f"w{i}": (torch.randn(37, 29, generator=g) * 100).to(dt)
               for i, dt in enumerate((torch.float16, torch.float32, torch.bfloat16, torch.float64))}
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    refs = tensorfile.read_safetensors(str(path))
    for name, ref in refs.items():
        for dt in (torch.float32, torch.bfloat16, torch.float16, ref.dtype):
            out = torch.empty(ref.shape, dtype=dt)
            ref.load_into(out)
            assert torch.equal(out, tensors[name].to(dt)), (name, dt)
    results = {}

    def read(k):
        outs = []
        for _ in range(20):
            out = torch.empty(refs["w0"].shape, dtype=torch.float32)
            refs["w0"].load_into(out)
            outs.append(out)
        results[k] = outs

    threads = [threading.Thread(target=read, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(o, tensors["w0"].float()) for outs in results.values() for o in outs)
    with open(path, "r+b") as f:
        f.truncate(tensorfile.read_header(str(path))[1] + 10)  # the header and 10 bytes of data are left
    for ref in refs.values():
        for dt in (torch.float32, ref.dtype):  # converting or straight
            with pytest.raises(CheckpointError, match="file is truncated"):
                ref.load_into(torch.empty(ref.shape, dtype=dt))
