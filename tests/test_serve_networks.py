"""fastsd.serve's LoRA/embedding folders on their own: names are file stems found in the folder, paths are
refused, and merging goes through Pipeline.load_lora / unload_loras (a stand-in pipeline records the calls)."""
import pytest

from fastsd import CheckpointError
from fastsd.serve.limits import BadRequest
from fastsd.files import files_by_stem
from fastsd.lora import LORA_EXTS
from fastsd.serve.networks import Networks
from fastsd.testing_lora import set_metadata


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
    assert nets.parse("<lora:a:0.5> <lyco:b>") == ((str(loras / "a.safetensors"), 0.5, "a"),
                                                   (str(loras / "b.pt"), 1.0, "b"))
    assert nets.parse("<lora:a:1:0.5>") == ((str(loras / "a.safetensors"), (1.0, 0.5), "a"),)  # A1111's TE:UNET
    assert nets.parse("no tags here") == ()


class FakePipe:
    def __init__(self, bad: str | None = None):
        self.bad, self.calls = bad, []

    def load_lora(self, path, weight):
        self.calls.append(("load", path, weight))
        if path == self.bad:
            raise CheckpointError(f"{path}: not a LoRA (no lora_up/lora_down keys)")

    def load_loras(self, items):
        for path, weight, *_ in items:
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


def test_apply_reads_a_replaced_file_again(loras):
    """The same name and weight, but the file was replaced on disk (A1111 looks at its modification time)."""
    nets, pipe = Networks(str(loras), None), FakePipe()
    want, path = nets.parse("<lora:a:1>"), str(loras / "a.safetensors")
    nets.apply(pipe, want)
    nets.apply(pipe, want)
    (loras / "a.safetensors").write_bytes(b"another file")
    nets.apply(pipe, want)
    assert pipe.calls == [("load", path, 1.0), ("unload",), ("load", path, 1.0)]


def test_parse_with_loras_merged_for_good(loras):
    """serve --lora: a tag naming a LoRA merged at start, at its weight, asks for nothing more; at another weight
    it is refused (it would be merged twice); other tags resolve as before."""
    nets = Networks(str(loras), None, base=[("lcm", 1.0)])
    assert nets.parse("x <lora:lcm:1>") == ()
    assert nets.parse("<lora:lcm> <lora:a:0.5>") == ((str(loras / "a.safetensors"), 0.5, "a"),)
    with pytest.raises(BadRequest, match=r"lcm is merged into this server's models for good at weight 1 \(--lora\)"):
        nets.parse("<lora:lcm:0.5>")


def test_serve_lora_merged_for_good_at_start(tmp_path):
    """python -m fastsd.serve --lora FILE: the image of the CLI with the same --lora; the infotext names it; a
    --lora-dir LoRA switches on top of it and away again, back to the same image. A LoRA whose metadata names it
    otherwise (kohya's ss_output_name) is listed with that alias and its metadata, and found by it, as A1111 does."""
    import numpy as np
    from PIL import Image
    from serve_server import Server, decode, info

    from fastsd import load_pipeline
    from fastsd.generate import main as generate_main
    from fastsd.testing_lora import write_random_lora

    folder = tmp_path / "loras"
    folder.mkdir()
    pipe = load_pipeline("random:tiny", device="cpu", dtype="fp32", backend="torch")
    base = str(tmp_path / "lcm.safetensors")
    write_random_lora(base, pipe, fmt="kohya_ldm", rank=4, seed=1)
    write_random_lora(str(folder / "ink.safetensors"), pipe, fmt="kohya_ldm", rank=4, seed=2)
    write_random_lora(str(folder / "wash_v2.safetensors"), pipe, fmt="kohya_ldm", rank=4, seed=3)
    set_metadata(str(folder / "wash_v2.safetensors"), {"ss_output_name": "wash", "ss_network_dim": "4",
                                                       "ss_tag_frequency": '{"set": {"wash": 3}}'})
    small = {"steps": 2, "width": 64, "height": 64, "seed": 7, "cfg_scale": 1, "sampler_name": "Euler"}
    server = Server(["--model", "random:tiny", "--lora", base, "--lora-dir", str(folder)])
    try:
        with server.client() as c:
            def png(prompt: str):
                r = c.post("/sdapi/v1/txt2img", json={**small, "prompt": prompt})
                assert r.status_code == 200, r.text
                return np.asarray(decode(r.json()["images"][0])), info(r)

            plain, meta = png("a cat")
            assert "Lora hashes" in meta["infotexts"][0] and "<lora:lcm:1>" in meta["infotexts"][0]
            assert np.array_equal(png("a cat <lora:lcm:1>")[0], plain)  # the tag asks for nothing more
            r = c.post("/sdapi/v1/txt2img", json={**small, "prompt": "a cat <lora:lcm:0.5>"})
            assert r.status_code == 422 and "merged into this server's models for good" in r.json()["detail"]
            inked = png("a cat <lora:ink:0.6>")[0]
            assert not np.array_equal(inked, plain)
            assert np.array_equal(png("a cat")[0], plain)  # ink unloaded: back to the model with lcm merged
            listed = {lo["name"]: lo for lo in c.get("/sdapi/v1/loras").json()}
            assert listed["wash_v2"]["alias"] == "wash" and listed["ink"]["alias"] == "ink"
            assert listed["wash_v2"]["metadata"] == {"ss_output_name": "wash", "ss_network_dim": "4",
                                                     "ss_tag_frequency": {"set": {"wash": 3}}}  # (A1111 parses {...})
            washed, meta = png("a cat <lora:wash:0.6>")
            assert np.array_equal(washed, png("a cat <lora:wash_v2:0.6>")[0]) and not np.array_equal(washed, plain)
            assert "a cat <lora:wash:0.6>" in meta["infotexts"][0] and "wash: " in meta["infotexts"][0]
        assert "LoRA lcm:1.0 merged for good" in server.log_text()
    finally:
        server.stop()
    out = tmp_path / "cli.png"
    assert generate_main(["a cat", "--model", "random:tiny", "--lora", base, "--steps", "2", "--cfg-scale", "1",
                          "--sampler", "Euler", "--seed", "7", "--width", "64", "--height", "64", "--threads", "1",
                          "--no-progress", "--out", str(out)]) == 0
    with Image.open(out) as cli:
        assert np.array_equal(np.asarray(cli), plain)


def test_embeddings_dir_is_checked_at_start_and_defaults_to_the_environment(monkeypatch, capsys, tmp_path):
    """--embeddings-dir defaults to $FASTSD_EMBEDDINGS_DIR, as python -m fastsd.generate's and the server's other
    folder flags do; the flag wins; a folder that isn't one is one `error:` line before any model work."""
    from fastsd.serve import __main__
    from fastsd.serve.__main__ import build_parser, main as serve_main

    monkeypatch.setattr(__main__, "_serve", lambda state, sock, level: sock.close() or 0)  # never serve here
    monkeypatch.delenv("FASTSD_EMBEDDINGS_DIR", raising=False)
    assert build_parser().parse_args([]).embeddings_dir is None
    monkeypatch.setenv("FASTSD_EMBEDDINGS_DIR", "/nonexistent/embeddings")
    assert build_parser().parse_args([]).embeddings_dir == "/nonexistent/embeddings"
    assert serve_main(["--port", "0", "--model", "random:tiny"]) == 2
    assert capsys.readouterr().err == "error: --embeddings-dir /nonexistent/embeddings: not a folder\n"
    assert build_parser().parse_args(["--embeddings-dir", str(tmp_path)]).embeddings_dir == str(tmp_path)
