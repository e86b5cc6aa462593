"""fastsd.serve's LoRA/embedding folders on their own: names are file stems found in the folder, paths are
refused, and merging goes through Pipeline.load_lora / unload_loras (a stand-in pipeline records the calls)."""
import pytest

from fastsd import CheckpointError
from fastsd.serve.limits import BadRequest
from fastsd.files import files_by_stem
from fastsd.lora import LORA_EXTS
from fastsd.serve.networks import Networks


@pytest.fixture
def loras(tmp_path):
    for name in ("a.safetensors", "b.pt", "sub/c.ckpt", "sub/a.safetensors", ".hidden.safetensors", "notes.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    return tmp_path


def test_scan_names_are_stems_of_the_folder_and_its_subfolders(loras):
    found = files_by_stem(str(loras), LORA_EXTS)
    assert list(found) == ["a", "b", "c"]
    assert found["a"] == str(loras / "a.safetensors")  # the first of two files with one stem
    assert files_by_stem(None, LORA_EXTS) == {}
    assert Networks(str(loras), None).loras() == found  # the server lists what fastsd.lora finds


@pytest.mark.parametrize("prompt,words", [
    ("x <lora:../a:1>", "refused"), ("x <lora:/etc/passwd>", "refused"), ("<lora:sub/c>", "refused"),
    ("<lora:..\\a>", "refused"), ("<lora:.hidden>", "refused"), ("<lora:zzz:1>", "unknown LoRA; this server has: a, b, c"),
    ("<lora:a:heavy>", "the weight 'heavy' is not a number"), ("<hypernet:a:1>", "fastsd reads <lora:NAME:WEIGHT>"),
])
def test_parse_refuses_paths_and_unknown_names(loras, prompt, words):
    nets = Networks(str(loras), None)
    with pytest.raises(BadRequest) as e:
        nets.parse(prompt)
    assert words in str(e.value) and e.value.status == 422


def test_parse_without_a_folder(loras):
    with pytest.raises(BadRequest, match="no LoRA folder"):
        Networks(None, None).parse("<lora:a>")
    nets = Networks(str(loras), None)
    assert nets.parse("<lora:a:0.5> <lyco:b>") == ((str(loras / "a.safetensors"), 0.5), (str(loras / "b.pt"), 1.0))
    assert nets.parse("<lora:a:1:0.5>") == ((str(loras / "a.safetensors"), (1.0, 0.5)),)  # A1111's TE:UNET
    assert nets.parse("no tags here") == ()


class FakePipe:
    def __init__(self, bad: str | None = None):
        self.bad, self.calls = bad, []

    def load_lora(self, path, weight):
        self.calls.append(("load", path, weight))
        if path == self.bad:
            raise CheckpointError(f"{path}: not a LoRA (no lora_up/lora_down keys)")

    def load_loras(self, items):
        for path, weight in items:
            self.load_lora(path, weight)

    def unload_loras(self):
        self.calls.append(("unload",))


def test_apply_merges_once_swaps_sets_and_undoes_a_failed_load(loras):
    nets = Networks(str(loras), None)
    pipe = FakePipe(bad=str(loras / "b.pt"))
    want = nets.parse("x <lora:a:0.5>")
    nets.apply(pipe, want)
    nets.apply(pipe, want)  # the same set again: nothing to do
    assert pipe.calls == [("load", str(loras / "a.safetensors"), 0.5)]
    with pytest.raises(BadRequest) as e:
        nets.apply(pipe, nets.parse("<lora:a><lora:b:0.3>"))
    assert str(e.value) == "b.pt: not a LoRA (no lora_up/lora_down keys)"  # the server's folder is not shown
    assert pipe.calls[1:] == [("unload",), ("load", str(loras / "a.safetensors"), 1.0),
                              ("load", str(loras / "b.pt"), 0.3), ("unload",)]
    nets.apply(pipe, ())  # the failed set left no LoRA merged: nothing to unload
    assert pipe.calls[-1] == ("unload",) and len(pipe.calls) == 5
