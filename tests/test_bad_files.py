"""Broken files users bring, as a bad-input hunt found them (2026-12-07): a model, VAE, TAESD, LoRA or embedding file
with a tensor of the wrong rank, a sparse / meta / complex tensor, a scale beyond fp32, a header nested too deep,
NaN VAE weights, a TAESD scaling_factor of NaN or 0; and names that are not UTF-8, --threads beyond what OpenMP
starts, an existing --preview file, an empty --out. Each: one `error:` line, exit 2, nothing written (or, where the
file is fine, a run that works)."""
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import fastsd
from fastsd.checkpoint import ldm_state_dict
from fastsd.generate import build_parser, main
from fastsd.testing_lora import diffusers_names, write_random_lora

TINY = ["--model", "random:tiny", "--steps", "1", "--width", "64", "--height", "64", "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def pipe():
    return fastsd.load_pipeline("random:tiny", device="cpu", dtype="fp32", backend="torch")


@pytest.fixture(scope="module")
def files(pipe, tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    model, vae = ldm_state_dict(pipe), ldm_state_dict(pipe, ("vae",))
    vae = {k.removeprefix("first_stage_model."): v for k, v in vae.items()}
    write_random_lora(str(d / "lora.safetensors"), pipe, fmt="kohya_ldm", rank=4, alpha=2.0)
    return d, model, vae, load_file(str(d / "lora.safetensors"))


def _one_error(capsys, code, match):
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if not ln.startswith(("fastsd: ", "warning: "))]
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], err


def _run(tmp_path, *args):
    return main(["a cat", *TINY, "--out", str(tmp_path / "o.png"), *args])


@pytest.mark.parametrize("key,value,option,match", [
    ("model.diffusion_model.input_blocks.0.0.weight", torch.randn(5), "--model",
     "not a Stable Diffusion 1.x checkpoint (tensor input_blocks.0.0.weight has shape (5,), not a 4-d layer weight)"),
    ("model.diffusion_model.input_blocks.0.0.weight", torch.randn(0, 4, 3, 3), "--model",
     "tensor input_blocks.0.0.weight has shape (0, 4, 3, 3)"),
    ("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", torch.randn(5), "--model",
     "tensor text_model.embeddings.token_embedding.weight has shape (5,)"),
    ("post_quant_conv.weight", torch.randn(4), "--vae",
     "not a VAE of Stable Diffusion 1.x (tensor post_quant_conv.weight has shape (4,), not a 4-d layer weight)"),
])
def test_a_tensor_of_the_wrong_rank(tmp_path, capsys, files, key, value, option, match):
    _, model, vae, _ = files
    sd = dict(model if option == "--model" else vae, **{key: value})
    save_file(sd, str(tmp_path / "f.safetensors"))
    _one_error(capsys, _run(tmp_path, option, str(tmp_path / "f.safetensors")), match)
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("kind,match", [("sparse", "is a sparse tensor"), ("meta", "is a meta (data-less) tensor"),
                                        ("complex", "is a complex tensor")])
def test_pickles_of_tensors_that_are_not_plain(tmp_path, capsys, files, kind, match):
    """torch.load(weights_only=True) takes sparse, meta and complex tensors; fastsd refuses them in the file reader
    (a LoRA, a VAE, an embedding alike)."""
    _, _, vae, lora = files
    make = {"sparse": lambda t: t.to_sparse(), "meta": lambda t: t.to("meta"), "complex": lambda t: t * (1 + 1j)}[kind]
    key = next(k for k in lora if k.endswith("lora_down.weight"))
    torch.save(dict(lora, **{key: make(lora[key])}), tmp_path / "l.pt")
    _one_error(capsys, _run(tmp_path, "--lora", str(tmp_path / "l.pt")), f"{key} {match}")
    torch.save(dict(vae, **{"decoder.conv_out.weight": make(vae["decoder.conv_out.weight"])}), tmp_path / "v.ckpt")
    _one_error(capsys, _run(tmp_path, "--vae", str(tmp_path / "v.ckpt")), f"decoder.conv_out.weight {match}")
    (tmp_path / "emb").mkdir()
    torch.save({"string_to_param": {"*": make(torch.randn(2, 32))}}, tmp_path / "emb" / "word.pt")
    _one_error(capsys, main(["a cat word", *TINY, "--out", str(tmp_path / "o.png"), "--embeddings-dir",
                             str(tmp_path / "emb")]), f"string_to_param.* {match}")
    assert not (tmp_path / "o.png").exists()


def test_lora_scales_beyond_fp32_and_headers_nested_too_deep(tmp_path, capsys, files, pipe):
    _, _, _, lora = files
    key = next(k for k in lora if k.endswith(".alpha"))
    save_file(dict(lora, **{key: torch.tensor(1e300, dtype=torch.float64)}), str(tmp_path / "a.safetensors"))
    _one_error(capsys, _run(tmp_path, "--lora", str(tmp_path / "a.safetensors")), "absurdly large values")
    write_random_lora(str(tmp_path / "p.safetensors"), pipe, fmt="peft", rank=4, alpha=2.0, text_encoder=False,
                      names=diffusers_names(pipe))
    capsys.readouterr()  # (diffusers' own output while making the names)
    for meta, match in (("[" * 100000 + "]" * 100000, "can't be read (nested too deep)"),
                        ('{"unet.lora_alpha": ' + "9" * 5000 + "}", "can't be read (a number too long to read)"),
                        ('{"unet.lora_alpha": 1e308, "unet.r": 4}', "absurdly large values")):
        save_file(load_file(str(tmp_path / "p.safetensors")), str(tmp_path / "d.safetensors"),
                  metadata={"lora_adapter_metadata": meta})
        _one_error(capsys, _run(tmp_path, "--lora", str(tmp_path / "d.safetensors")), match)
    assert not (tmp_path / "o.png").exists()


def test_emb_params_that_is_not_a_tensor(tmp_path, capsys):
    (tmp_path / "emb").mkdir()
    torch.save({"emb_params": {"a": torch.randn(2, 32)}}, tmp_path / "emb" / "word.pt")
    _one_error(capsys, main(["a cat word", *TINY, "--out", str(tmp_path / "o.png"), "--embeddings-dir",
                             str(tmp_path / "emb")]), "emb_params holds a dict; an embedding holds a tensor there")


def test_nan_vae_weights_are_an_error_not_a_black_image(tmp_path, capsys, files):
    _, model, vae, _ = files
    conv = "decoder.conv_out.weight"
    save_file(dict(vae, **{conv: torch.full_like(vae[conv], float("nan"))}), str(tmp_path / "v.safetensors"))
    _one_error(capsys, _run(tmp_path, "--vae", str(tmp_path / "v.safetensors")),
               f"the VAE decode gave NaN or infinite values in float32: the model's weights hold NaN or infinite "
               f"values (first_stage_model.{conv}); the VAE file is damaged")
    key = "first_stage_model." + conv
    save_file(dict(model, **{key: torch.full_like(model[key], float("nan"))}), str(tmp_path / "m.safetensors"))
    _one_error(capsys, _run(tmp_path, "--model", str(tmp_path / "m.safetensors")), "the model file is damaged")
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("scale", [float("nan"), 0, -1.0, float("inf")])
def test_taesd_folder_scaling_factor(tmp_path, capsys, scale):
    from fastsd.testing import diffusers_taesd

    diffusers_taesd().save_pretrained(tmp_path / "t")
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    (tmp_path / "t" / "config.json").write_text(json.dumps(dict(cfg, scaling_factor=scale)))
    _one_error(capsys, _run(tmp_path, "--vae", f"taesd:{tmp_path / 't'}"), "is not a finite positive number")


def test_threads_beyond_what_openmp_starts(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["a cat", "--threads", "100000"])
    assert e.value.code == 2 and "expected an integer from 1 to 1024, got 100000" in capsys.readouterr().err


def test_names_that_are_not_utf8(tmp_path, capsys, files):
    """A LoRA whose file name is not UTF-8 runs and its infotext shows the bytes as \\xNN (the PNG text chunk can't
    hold them raw: the save failed after the generation); an embedding of such a name (no prompt can write it) is
    skipped with a warning, not a failure of every run."""
    import os

    d, _, _, lora = files
    name = os.fsdecode(b"nu\xff")
    save_file(lora, str(tmp_path / f"{name}.safetensors"))
    assert _run(tmp_path, "--lora", str(tmp_path / f"{name}.safetensors")) == 0
    assert "Lora hashes: \"nu\\xff: " in Image.open(tmp_path / "o.png").info["parameters"]
    (tmp_path / "emb").mkdir()
    torch.save({"string_to_param": {"*": torch.randn(1, 32)}}, tmp_path / "emb" / f"{name}.pt")
    assert main(["a cat", *TINY, "--out", str(tmp_path / "o2.png"), "--embeddings-dir", str(tmp_path / "emb")]) == 0
    assert "embeddings whose file names are not UTF-8 text" in capsys.readouterr().err


def test_existing_preview_file_and_empty_out(tmp_path, capsys):
    keep = tmp_path / "keep.png"
    Image.new("RGB", (5, 5)).save(keep)
    _one_error(capsys, _run(tmp_path, "--preview", str(keep)), "the file exists (--overwrite replaces it)")
    assert Image.open(keep).size == (5, 5) and not (tmp_path / "o.png").exists()
    assert _run(tmp_path, "--preview", str(keep), "--overwrite") == 0 and Image.open(keep).size == (8, 8)  # (latent size)
    _one_error(capsys, main(["a cat", *TINY, "--out", ""]), "--out: an empty path")


def test_unclear_messages_made_clear(tmp_path, capsys):
    """An empty --vae was "taesd needs a path"; a tag left open before another (<lora:a:<lora:a:1>>) was blamed on
    DyLoRA's dyn dimension."""
    _one_error(capsys, _run(tmp_path, "--vae", ""), "an empty VAE path")
    _one_error(capsys, main(["a <lora:good:<lora:good:1>> cat", *TINY, "--out", str(tmp_path / "o.png")]),
               "a '<' inside a <lora:...> tag (one left unclosed?)")
    assert not (tmp_path / "o.png").exists()
