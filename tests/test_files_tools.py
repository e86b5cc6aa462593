"""Model files as other tools write them (a hunt of 2026-12-07, /work/notes/s35/files_hunt): PyTorch Lightning
.ckpt files (sd-v1-4.ckpt's callbacks, numpy scalars), rinongal's textual-inversion embeddings, keys other
tools leave (CLIP's logit scale and text projection, lvlb_weights, embedding_manager), checkpoints without a VAE
given one with --vae, upper-case extensions, sharded diffusers folders; and v-prediction models, refused in one
line wherever they say so (ComfyUI's v_pred/ztsnr keys, A1111's NAME.yaml, diffusers' scheduler_config.json)."""
import json
import pickle
import shutil
import sys
import types

import numpy as np
import pytest
import safetensors.torch
import torch
from oracles import save_diffusers_folder
from test_generate_cli import _fails  # one-line error, exit 2, nothing written

from fastsd import CheckpointError, load_pipeline
from fastsd.checkpoint import ldm_state_dict
from fastsd.config import TINY
from fastsd.embeddings import read_embedding

LIGHTNING = "pytorch_lightning.callbacks.model_checkpoint"


@pytest.fixture(scope="module")
def tiny():
    """random:tiny's LDM state dict, and its weights as loaded (the reference)."""
    pipe = load_pipeline("random:tiny", device="cpu", dtype="fp32", backend="torch")
    return ldm_state_dict(pipe), _params(pipe)


def _params(pipe, parts=("clip", "vae", "unet")):
    return {f"{m}.{k}": v for m in parts for k, v in getattr(pipe, m).state_dict().items()}


def _loads_the_same(source, reference, **kw):
    got = _params(load_pipeline(str(source), device="cpu", dtype="fp32", backend="torch", **kw))
    assert got.keys() == reference.keys()
    assert all(torch.equal(got[k], v) for k, v in reference.items())


def _one_line_error(source, match, **kw):
    with pytest.raises(CheckpointError, match=match) as e:
        load_pipeline(str(source), device="cpu", dtype="fp32", backend="torch", **kw)
    assert "\n" not in str(e.value)


@pytest.fixture
def lightning(monkeypatch):
    """PyTorch Lightning's ModelCheckpoint class as the writer sees it (the loader never imports it)."""
    mod = types.ModuleType(LIGHTNING)
    cls = type("ModelCheckpoint", (), {"__module__": LIGHTNING})
    mod.ModelCheckpoint = cls
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", LIGHTNING):
        monkeypatch.setitem(sys.modules, name, mod)
    return cls


def _lightning_ckpt(sd, checkpoint_cls) -> dict:
    """What PyTorch Lightning 1.4 saved for SD1's release files (sd-v1-4.ckpt): callbacks keyed by the class."""
    return {"epoch": 6, "global_step": 470000, "pytorch-lightning_version": "1.4.2", "state_dict": sd,
            "callbacks": {checkpoint_cls: {"monitor": None, "best_model_score": None, "best_model_path": "",
                                           "current_score": None, "dirpath": "logs/checkpoints"}}}


def test_lightning_ckpt_with_callbacks_loads_as_a1111_and_comfyui_do(tiny, tmp_path, lightning):
    sd, reference = tiny
    torch.save(_lightning_ckpt(sd, lightning), tmp_path / "sd-v1-4.ckpt")
    _loads_the_same(tmp_path / "sd-v1-4.ckpt", reference)


def test_ckpt_with_numpy_scalars_loads(tiny, tmp_path):
    sd, reference = tiny
    torch.save({"state_dict": sd, "global_step": np.int64(5), "best": np.float64(0.25)}, tmp_path / "np.ckpt")
    _loads_the_same(tmp_path / "np.ckpt", reference)


def test_lightning_vae_ckpt_with_loss_keys_loads(tiny, tmp_path, lightning):
    sd, reference = tiny
    vae = {k.removeprefix("first_stage_model."): v for k, v in sd.items() if k.startswith("first_stage_model.")}
    torch.save({**_lightning_ckpt({**vae, "loss.logvar": torch.zeros(())}, lightning)}, tmp_path / "kl-f8.ckpt")
    pipe = load_pipeline("random:tiny", device="cpu", dtype="fp32", backend="torch", vae=str(tmp_path / "kl-f8.ckpt"))
    got = _params(pipe, ("vae",))
    assert all(torch.equal(got[k], v) for k, v in reference.items() if k.startswith("vae."))


def test_numpy_value_in_a_state_dict_is_named(tiny, tmp_path):
    sd, _ = tiny
    torch.save({"state_dict": {**sd, "alphas_cumprod": np.ones(3)}}, tmp_path / "np.ckpt")
    _one_line_error(tmp_path / "np.ckpt", "alphas_cumprod holds a numpy value, not a tensor")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_allowed_stand_ins_do_not_let_other_globals_through(tiny, tmp_path, lightning):
    marker = tmp_path / "pwned"
    ckpt = {**_lightning_ckpt({"x": torch.zeros(1)}, lightning), "payload": _RunsCode(marker)}
    torch.save(ckpt, tmp_path / "evil.ckpt")
    _one_line_error(tmp_path / "evil.ckpt", "refused to load.*system")
    with open(tmp_path / "evil_legacy.ckpt", "wb") as f:
        pickle.dump({"state_dict": {"x": _RunsCode(marker)}, "step": np.int64(1)}, f, protocol=2)
    _one_line_error(tmp_path / "evil_legacy.ckpt", "refused to load")
    assert not marker.exists()


def test_original_textual_inversion_embedding_with_a_parameter_dict(tmp_path):
    vec = torch.randn(2, TINY.clip.hidden_size)
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(vec.clone())})
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": params}, tmp_path / "old.pt")
    emb = read_embedding(str(tmp_path / "old.pt"), "old", TINY.clip.hidden_size)
    assert torch.equal(emb.vectors, vec)


@pytest.mark.parametrize("key, value", [
    ("cond_stage_model.logit_scale", torch.tensor(4.6)),  # older ComfyUI saves: its SD1 CLIP holds these two
    ("cond_stage_model.transformer.text_projection.weight", torch.eye(TINY.clip.hidden_size)),
    ("lvlb_weights", torch.ones(1000)),
    ("embedding_manager.embedder.transformer.text_model.x", torch.zeros(2)),  # rinongal's trainer
])
def test_keys_other_tools_leave_are_ignored_as_a1111_does(tiny, tmp_path, key, value):
    sd, reference = tiny
    safetensors.torch.save_file({**sd, key: value}, str(tmp_path / "m.safetensors"))
    _loads_the_same(tmp_path / "m.safetensors", reference)


def test_checkpoint_without_a_vae_loads_with_one_given(tiny, tmp_path):
    sd, reference = tiny
    model = {k: v for k, v in sd.items() if not k.startswith("first_stage_model.")}
    safetensors.torch.save_file(model, str(tmp_path / "novae.safetensors"))
    vae = {k.removeprefix("first_stage_model."): v for k, v in sd.items() if k.startswith("first_stage_model.")}
    safetensors.torch.save_file(vae, str(tmp_path / "vae.safetensors"))
    _loads_the_same(tmp_path / "novae.safetensors", reference, vae=str(tmp_path / "vae.safetensors"))
    _one_line_error(tmp_path / "novae.safetensors", r"has no VAE weights \(first_stage_model.\*\); give a VAE file")


def test_upper_case_extensions(tiny, tmp_path):
    sd, reference = tiny
    safetensors.torch.save_file(sd, str(tmp_path / "Model.SAFETENSORS"))
    _loads_the_same(tmp_path / "Model.SAFETENSORS", reference)
    torch.save({"state_dict": sd}, tmp_path / "Model.CKPT")
    _loads_the_same(tmp_path / "Model.CKPT", reference)
    vec = torch.randn(1, TINY.clip.hidden_size)
    safetensors.torch.save_file({"emb_params": vec}, str(tmp_path / "Style.SAFETENSORS"))
    assert torch.equal(read_embedding(str(tmp_path / "Style.SAFETENSORS"), "s", TINY.clip.hidden_size).vectors, vec)


def test_instruct_pix2pix_is_named(tiny, tmp_path):
    sd, _ = tiny
    w = sd["model.diffusion_model.input_blocks.0.0.weight"]
    edited = {**sd, "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(w.shape[0], 8, *w.shape[2:])}
    safetensors.torch.save_file(edited, str(tmp_path / "ip2p.safetensors"))
    _one_line_error(tmp_path / "ip2p.safetensors", r"8 input channels \(an InstructPix2Pix model\)")


def test_instruct_pix2pix_folder_is_named(folder, tmp_path):
    copy = tmp_path / "ip2p"
    shutil.copytree(folder, copy)
    cfg = json.loads((copy / "unet" / "config.json").read_text())
    (copy / "unet" / "config.json").write_text(json.dumps({**cfg, "in_channels": 8}))
    _one_line_error(copy, "in_channels 8; an InstructPix2Pix model; fastsd loads UNets of 4")


# ---- v-prediction and zero-terminal-SNR models: refused wherever the files say so -----------------------

@pytest.mark.parametrize("key, what", [("v_pred", "a v-prediction model"), ("ztsnr", "a zero-terminal-SNR model")])
def test_comfyui_sampling_markers_are_refused(tiny, tmp_path, key, what):
    sd, _ = tiny
    safetensors.torch.save_file({**sd, key: torch.tensor([])}, str(tmp_path / "m.safetensors"))
    _one_line_error(tmp_path / "m.safetensors", f"{what} \\(its '{key}' key, as ComfyUI marks one\\); fastsd "
                                                "samples epsilon-prediction models")


def test_modelspec_metadata_saying_v_is_refused(tiny, tmp_path):
    sd, reference = tiny
    path = str(tmp_path / "m.safetensors")
    safetensors.torch.save_file(sd, path, metadata={"modelspec.architecture": "stable-diffusion-v1",
                                                    "modelspec.prediction_type": "epsilon"})
    _loads_the_same(path, reference)
    safetensors.torch.save_file(sd, path, metadata={"modelspec.architecture": "stable-diffusion-v1",
                                                    "modelspec.prediction_type": "v"})  # kohya's v_parameterization
    _one_line_error(path, "its metadata says modelspec.prediction_type 'v' .*epsilon-prediction models")


def test_a1111_yaml_beside_the_checkpoint_saying_v_is_refused(tiny, tmp_path):
    sd, reference = tiny
    safetensors.torch.save_file(sd, str(tmp_path / "m.safetensors"))
    (tmp_path / "m.yaml").write_text('model:\n  params:\n    parameterization: "eps"\n')
    _loads_the_same(tmp_path / "m.safetensors", reference)
    (tmp_path / "m.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    _one_line_error(tmp_path / "m.safetensors", "m.yaml: parameterization 'v' .*epsilon-prediction models")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    save_diffusers_folder(TINY, root / "model")
    return root / "model"


def _scheduler(folder, tmp_path, **values):
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    (copy / "scheduler").mkdir()
    (copy / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
         "num_train_timesteps": 1000, **values}))
    return copy


@pytest.mark.parametrize("values, match", [
    ({"prediction_type": "v_prediction"}, 'prediction_type "v_prediction"; fastsd samples epsilon'),
    ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr true .a zero-terminal-SNR model.; fastsd"),
])
def test_diffusers_scheduler_config_of_another_prediction_is_refused(folder, tmp_path, values, match):
    _one_line_error(_scheduler(folder, tmp_path, **values), match)


def test_diffusers_epsilon_scheduler_config_loads(folder, tmp_path):
    load_pipeline(str(_scheduler(folder, tmp_path, prediction_type="epsilon")), device="cpu", dtype="fp32")


def test_cli_v_prediction_file_exits_2_with_one_line(tiny, tmp_path, capsys):
    sd, _ = tiny
    safetensors.torch.save_file({**sd, "v_pred": torch.tensor([])}, str(tmp_path / "v.safetensors"))
    _fails(["--model", str(tmp_path / "v.safetensors")], tmp_path, capsys, "a v-prediction model")


# ---- sharded diffusers folders -------------------------------------------------------------------------

def _shard(part, stem, index_name, shard_name):
    """Split `part`/`stem`.safetensors in two shards with a weight_map index, as save_pretrained(max_shard_size=)."""
    f = part / f"{stem}.safetensors"
    sd = safetensors.torch.load_file(str(f))
    f.unlink()
    keys = sorted(sd)
    shards = {shard_name.format(i=i): keys[i - 1::2] for i in (1, 2)}
    for name, ks in shards.items():
        safetensors.torch.save_file({k: sd[k] for k in ks}, str(part / name))
    wmap = {k: name for name, ks in shards.items() for k in ks}
    (part / index_name).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": wmap}))
    return wmap


def test_sharded_diffusers_folder_loads(folder, tmp_path):
    reference = _params(load_pipeline(str(folder), device="cpu", dtype="fp32", backend="torch"))
    copy = tmp_path / "sharded"
    shutil.copytree(folder, copy)
    _shard(copy / "unet", "diffusion_pytorch_model", "diffusion_pytorch_model.safetensors.index.json",
           "diffusion_pytorch_model-0000{i}-of-00002.safetensors")
    _shard(copy / "text_encoder", "model", "model.safetensors.index.fp16.json",
           "model.fp16-0000{i}-of-00002.safetensors")
    _loads_the_same(copy, reference)


def test_sharded_folder_whose_index_does_not_fit_its_shards(folder, tmp_path):
    copy = tmp_path / "sharded"
    shutil.copytree(folder, copy)
    index = copy / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    wmap = _shard(copy / "unet", "diffusion_pytorch_model", index.name, "s{i}.safetensors")
    moved = next(iter(wmap))
    index.write_text(json.dumps({"weight_map": {**wmap, moved: "s9.safetensors" if wmap[moved] == "s1.safetensors"
                                                else "s1.safetensors"}}))
    _one_line_error(copy, f"holds {moved}, which the index puts in")
    index.write_text(json.dumps({"weight_map": {**wmap, "extra.weight": wmap[moved]}}))
    _one_line_error(copy, r"1 listed tensors are in no shard \(extra.weight\)")
    index.write_text(json.dumps({"weight_map": {k: "../" + v for k, v in wmap.items()}}))
    _one_line_error(copy, "is not a file name in this folder")
