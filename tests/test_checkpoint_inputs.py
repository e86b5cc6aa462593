"""Bad model files and folders (the audit's cases): each is ONE line, a CheckpointError naming the file (and the
config field and value), found at load before any sampling; the CLI prints it as `error: ...` and exits 2."""
import json
import os
import shutil
import threading
import time

import pytest
import safetensors.torch
import torch
from oracles import save_diffusers_folder

from fastsd import CheckpointError, load_pipeline
from fastsd.checkpoint import from_diffusers_folder, ldm_state_dict, resolve
from fastsd.config import TINY
from fastsd.generate import main

ASSETS = os.path.join(os.path.dirname(__file__), "..", "fastsd", "assets")
UNET_W = os.path.join("unet", "diffusion_pytorch_model.safetensors")
UNET_CFG = os.path.join("unet", "config.json")
TEXT_CFG = os.path.join("text_encoder", "config.json")
CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
TIME_W = "model.diffusion_model.time_embed.0.weight"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A TINY diffusers folder and its LDM state dict."""
    root = tmp_path_factory.mktemp("tiny") / "diffusers"
    save_diffusers_folder(TINY, root)
    return root, ldm_state_dict(from_diffusers_folder(str(root)))


@pytest.fixture
def folder(tiny, tmp_path):
    """A copy of the TINY folder to break (weights hard-linked: replace them, never write into them)."""
    dst = tmp_path / "model"
    shutil.copytree(tiny[0], dst, copy_function=lambda s, d: (os.link if s.endswith(".safetensors") else shutil.copy2)(s, d))
    return dst


def _unblock_fifo_later(path, after=8.0, until=40.0):
    """If something blocks opening the FIFO `path` for reading (the bug), open its other end after `after`
    seconds so that the test fails instead of hanging; a fixed loader never opens it."""
    def run():
        time.sleep(after)
        end = time.time() + until
        while time.time() < end and os.path.exists(path):
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                time.sleep(0.2)

    threading.Thread(target=run, daemon=True).start()


def _error(source) -> str:
    """The one-line CheckpointError of loading `source` (found by resolve, before any weight is read)."""
    with pytest.raises(CheckpointError) as e:
        load_pipeline(str(source), device="cpu", dtype="fp32")
    msg = str(e.value)
    assert "\n" not in msg and "\r" not in msg
    return msg


def _cli_fails(model, tmp_path, capsys) -> str:
    out = tmp_path / "out"
    code = main(["x", "--steps", "2", "--width", "64", "--height", "64", "--out", str(out) + os.sep, "--no-progress",
                 "--threads", "1", "--model", str(model)])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "Traceback" not in err + captured.out
    assert not out.exists() or not any(out.iterdir())  # nothing written
    return err


# ---- 1. things that are not regular files -----------------------------------------------------------------

def test_fifo_device_and_loop_as_model_are_named_not_missing(tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    _unblock_fifo_later(fifo)
    assert _error(fifo) == f"{fifo}: not a regular file (a FIFO)"
    for dev in ("/dev/null", "/dev/zero"):
        assert _error(dev) == f"{dev}: not a regular file (a character device)"
    link = tmp_path / "zero.safetensors"
    os.symlink("/dev/zero", link)
    assert _error(link) == f"{link}: not a regular file (a character device)"
    loop = tmp_path / "loop.safetensors"
    os.symlink(loop.name, loop)
    assert _error(loop) == f"{loop}: cannot be read (a symbolic link loop)"
    broken = tmp_path / "broken.ckpt"
    os.symlink("nowhere.ckpt", broken)
    assert _error(broken) == f"{broken}: a broken symbolic link"


def test_cli_fifo_as_model_exits_2_with_one_line(tmp_path, capsys):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    _unblock_fifo_later(fifo)
    assert _cli_fails(fifo, tmp_path, capsys) == f"error: {fifo}: not a regular file (a FIFO)"


@pytest.mark.parametrize("make,what", [
    (os.mkfifo, "not a regular file (a FIFO)"),
    (lambda p: os.symlink("/dev/zero", p), "not a regular file (a character device)"),
    (os.mkdir, "a folder, not a file"),
    (lambda p: os.symlink(os.path.basename(p), p), "cannot be read (a symbolic link loop)"),
])
@pytest.mark.parametrize("part", [UNET_W, UNET_CFG])
def test_folder_weights_or_config_that_is_not_a_regular_file(folder, part, make, what):
    path = folder / part
    path.unlink()
    make(str(path))
    if what.endswith("(a FIFO)"):
        _unblock_fifo_later(path)
    assert _error(folder) == f"{path}: {what}"


def test_oversized_config_json_is_refused_unread(folder):
    path = folder / UNET_CFG
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps(cfg) + " " * (2 << 20))  # valid JSON, 2 MiB
    msg = _error(folder)
    assert msg.startswith(f"{path}: ") and "too large for a model config" in msg


def test_config_json_with_a_number_of_5000_digits(folder):
    path = folder / UNET_CFG
    path.write_text(path.read_text().replace('"layers_per_block": 2', '"layers_per_block": 1' + "0" * 5000))
    assert _error(folder) == f"{path}: not valid JSON (a number too long to read)"


def test_model_index_that_is_not_an_object_in_a_folder_without_unet(folder):
    shutil.rmtree(folder / "unet")
    (folder / "model_index.json").write_text("[1]")
    assert _error(folder) == f"{folder / 'model_index.json'}: a JSON list, not a diffusers model index"


# ---- 2. config.json values ----------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value,want", [
    ("attention_head_dim", 0, "expected a positive integer"),
    ("attention_head_dim", -8, "expected a positive integer"),
    ("attention_head_dim", "8", "expected a positive integer"),
    ("attention_head_dim", 8.0, "expected a positive integer"),
    ("attention_head_dim", [8, 8, 8, 8], "a list of 2 (one per block_out_channels)"),
    ("attention_head_dim", 3, "must all be divisible by it"),
    ("block_out_channels", [0, 0], "expected a list of 1 to 8 positive integers"),
    ("block_out_channels", [-32, -64], "expected a list of 1 to 8 positive integers"),
    ("block_out_channels", [32, 2 ** 40], "expected a list of 1 to 8 positive integers"),
    ("block_out_channels", "32,64", "expected a list of 1 to 8 positive integers"),
    ("block_out_channels", [32, 48], "each must be a multiple of the first, 32"),
    ("norm_num_groups", 0, "expected a positive integer"),
    ("norm_num_groups", 7, "must all be divisible by it"),
    ("down_block_types", [1, 2], "expected a list of 'CrossAttnDownBlock2D' or 'DownBlock2D'"),
    ("down_block_types", ["CrossAttnDownBlock2D"], "1 blocks but block_out_channels has 2"),
    ("in_channels", None, "4 (text-to-image) or 9 (inpainting) input channels"),
    ("in_channels", float("nan"), "4 (text-to-image) or 9 (inpainting) input channels"),
    ("in_channels", 5, "4 (text-to-image) or 9 (inpainting) input channels"),
    ("layers_per_block", True, "expected a positive integer"),
    ("layers_per_block", 10 ** 12, "expected a positive integer (at most 64)"),
    ("cross_attention_dim", "128", "expected a positive integer"),
    ("cross_attention_dim", [128, 128], "expected a positive integer"),
    ("use_linear_projection", "false", "expected false"),
    ("sample_size", "64", "expected a positive integer"),
])
def test_unet_config_values(folder, field, value, want):
    path = folder / UNET_CFG
    cfg = json.loads(path.read_text())
    cfg[field] = value
    path.write_text(json.dumps(cfg))  # (NaN written as JSON's NaN, as diffusers writes it)
    msg = _error(folder)
    shown = json.dumps(value)
    assert msg.startswith(f"{path}: {field} {shown}; "), msg
    assert want in msg
    assert "does not match the text encoder" not in msg


@pytest.mark.parametrize("field,value,want", [
    ("num_attention_heads", 0, "expected a positive integer"),
    ("num_attention_heads", 3, f"hidden_size {TINY.clip.hidden_size} must be divisible by it"),
    ("hidden_size", "128", "expected a positive integer"),
    ("num_hidden_layers", -1, "expected a positive integer"),
    ("layer_norm_eps", -1, "expected a small positive number"),
    ("layer_norm_eps", 0, "expected a small positive number"),
    ("layer_norm_eps", float("nan"), "expected a small positive number"),
    ("eos_token_id", 10 ** 9, "expected a token id, 0 to 49407"),
    ("vocab_size", 10, "at least 49408"),
    ("max_position_embeddings", 5, "at least 77"),
])
def test_text_encoder_config_values(folder, field, value, want):
    path = folder / TEXT_CFG
    cfg = json.loads(path.read_text())
    cfg[field] = value
    path.write_text(json.dumps(cfg))
    msg = _error(folder)
    assert msg.startswith(f"{path}: {field} {json.dumps(value)}; "), msg
    assert want in msg


def test_another_family_is_named_before_its_values(folder):
    path = folder / UNET_CFG
    cfg = json.loads(path.read_text())
    cfg.update(addition_embed_type="text_time", attention_head_dim=[5, 10, 20])
    path.write_text(json.dumps(cfg))
    assert _error(folder) == (f"{path}: not an SD1.x model: its UNet has extra conditioning embeddings "
                              "(SDXL or another family)")


def test_text_encoder_family_message_names_the_file(folder):
    path = folder / TEXT_CFG
    cfg = json.loads(path.read_text())
    cfg["hidden_act"] = "gelu"
    path.write_text(json.dumps(cfg))
    assert _error(folder).startswith(f"{path}: not an SD1.x model: its text encoder uses gelu")


def test_cli_bad_config_value_exits_2_with_one_line(folder, tmp_path, capsys):
    path = folder / UNET_CFG
    cfg = json.loads(path.read_text())
    cfg["cross_attention_dim"] = "128"
    path.write_text(json.dumps(cfg))
    err = _cli_fails(folder, tmp_path, capsys)
    assert err.startswith(f"error: {path}: cross_attention_dim \"128\"; ")


# ---- 4. the folder's tokenizer: checked first, errors name the file ----------------------------------------

@pytest.mark.parametrize("name,content,want", [
    ("vocab.json", b"{not json", "not valid JSON"),
    ("vocab.json", b"\xff\xfe\x00", "not a UTF-8 text file"),
    ("vocab.json", b"[1, 2, 3]", "got a JSON list"),
    ("vocab.json", b'{"a": 0, "<|endoftext|>": 1}', "not the SD1 CLIP vocabulary (2 tokens"),
    ("merges.txt", b"\xff\xfe\x00\x01 zz\n", "not a UTF-8 text file"),
    ("merges.txt", b"", "no merges"),
    ("merges.txt", None, "no such file or folder"),
])
def test_bad_tokenizer_folder_is_named_before_weights_are_read(folder, name, content, want):
    tok = folder / "tokenizer"
    tok.mkdir()
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(ASSETS, f), tok / f)
    if content is None:
        (tok / name).unlink()
    else:
        (tok / name).write_bytes(content)
    (folder / UNET_W).unlink()  # so that reading weights first would fail on those instead
    (folder / UNET_W).write_bytes(b"junk")
    msg = _error(folder)
    assert msg.startswith(f"{tok / name}: ") and want in msg, msg


def test_tokenizer_whose_merges_do_not_fit_the_vocab(folder):
    tok = folder / "tokenizer"
    tok.mkdir()
    shutil.copy(os.path.join(ASSETS, "vocab.json"), tok / "vocab.json")
    (tok / "merges.txt").write_text("#version: 0.2\nonlyoneword\n")
    msg = _error(folder)
    assert msg.startswith(f"{tok}: vocab.json and merges.txt do not make a CLIP tokenizer"), msg


def test_good_tokenizer_folder_is_loaded_once_and_used(folder):
    tok = folder / "tokenizer"
    tok.mkdir()
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(ASSETS, f), tok / f)
    src = resolve(str(folder))
    assert src.tokenizer is not None and src.tokenizer_dir == str(tok)
    assert src.tokenizer.encode("a cat") == [320, 2368]


# ---- 5. single-file checkpoints ---------------------------------------------------------------------------

def _ldm_file(tiny, tmp_path, name, edit, save=None):
    sd = dict(tiny[1])
    edit(sd)
    path = tmp_path / name
    (save or safetensors.torch.save_file)(sd, str(path))
    return path


@pytest.mark.parametrize("channels", [5, 8])
def test_conv_in_with_other_than_4_or_9_channels_is_refused_at_load(tiny, tmp_path, channels):
    def edit(sd):
        sd[CONV_IN] = torch.zeros(sd[CONV_IN].shape[0], channels, 3, 3)

    path = _ldm_file(tiny, tmp_path, "m.safetensors", edit)
    msg = _error(path)
    assert msg.startswith(f"{path}: {CONV_IN} has shape ({TINY.unet.model_channels}, {channels}, ...)")
    assert "4 (text-to-image) or 9 (inpainting)" in msg


def test_token_embedding_smaller_than_the_tokenizer_is_refused_at_load(tiny, tmp_path):
    key = next(k for k in tiny[1] if k.endswith("token_embedding.weight"))
    path = _ldm_file(tiny, tmp_path, "m.safetensors", lambda sd: sd.update({key: sd[key][:10].clone()}))
    assert _error(path) == f"{path}: {key} has 10 rows; the SD1 CLIP tokenizer's ids need 49408"


def test_position_embedding_shorter_than_77_is_refused_at_load(tiny, tmp_path):
    key = next(k for k in tiny[1] if k.endswith("position_embedding.weight"))
    path = _ldm_file(tiny, tmp_path, "m.safetensors", lambda sd: sd.update({key: sd[key][:5].clone()}))
    assert _error(path) == f"{path}: {key} has 5 rows; SD1 prompts are 77 tokens long"


def test_ckpt_with_an_int_key(tiny, tmp_path):
    path = _ldm_file(tiny, tmp_path, "m.ckpt", lambda sd: sd.update({1: torch.zeros(1)}), save=torch.save)
    assert _error(path) == f"{path}: not a valid state dict: tensor keys must be strings, not int (1)"


def test_tensor_name_with_a_newline_stays_on_one_line(tiny, tmp_path, capsys):
    name = "model.diffusion_model.\u202eevil\nline"
    path = _ldm_file(tiny, tmp_path, "m.safetensors", lambda sd: sd.update({name: torch.zeros(1)}))
    msg = _error(path)
    assert msg.startswith(f"{path}: ") and repr(name[len("model.diffusion_model."):]) in msg
    _cli_fails(path, tmp_path, capsys)


def test_newline_in_any_checkpoint_error_is_escaped():
    assert str(CheckpointError("a\nb\rc")) == "a\\nb\\rc"


# ---- 6. dtypes: the same rule for .safetensors and .ckpt ---------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int64, torch.bool, torch.float8_e4m3fn])
@pytest.mark.parametrize("ext", ["safetensors", "ckpt"])
def test_non_float_and_fp8_weights_are_refused_naming_the_key(tiny, tmp_path, dtype, ext):
    save = safetensors.torch.save_file if ext == "safetensors" else torch.save
    path = _ldm_file(tiny, tmp_path, f"m.{ext}", lambda sd: sd.update({TIME_W: sd[TIME_W].to(dtype)}), save)
    msg = _error(path)
    assert msg.startswith(f"{path}: ")
    assert "time_embed.0.weight" in msg
    assert str(dtype).removeprefix("torch.") in msg or "F8_E4M3" in msg


@pytest.mark.parametrize("ext", ["safetensors", "ckpt"])
def test_float64_weights_are_cast(tiny, tmp_path, ext):
    save = safetensors.torch.save_file if ext == "safetensors" else torch.save
    path = _ldm_file(tiny, tmp_path, f"m.{ext}", lambda sd: sd.update({TIME_W: sd[TIME_W].double()}), save)
    pipe = load_pipeline(str(path), device="cpu", dtype="fp32")
    assert torch.equal(pipe.unet.state_dict()["time_embed.0.weight"], tiny[1][TIME_W].float())
