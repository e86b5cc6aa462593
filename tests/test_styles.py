"""A1111's prompt styles (fastsd/styles.py): the application rules against a transcription of A1111's own code,
reading styles.csv files and folders of them, the CLI's --styles-file / --style, and the server's `styles` field
and GET /sdapi/v1/prompt-styles."""
import itertools

import pytest
from PIL import Image
from serve_server import info, styles_server

from fastsd.generate import apply_cli_styles, build_parser, main
from fastsd.image import parse_infotext
from fastsd.serve.generation import _apply_styles
from fastsd.serve.schemas import Txt2ImgRequest
from fastsd.settings import FIELDS, GenerationSettings
from fastsd.styles import PromptStyle, StylesError, apply_styles, read_styles


# --- ORACLE: A1111's modules/styles.py (AUTOMATIC1111/stable-diffusion-webui), transcribed; not fastsd code --------
def oracle_merge_prompts(style_prompt: str, prompt: str) -> str:
    if "{prompt}" in style_prompt:
        res = style_prompt.replace("{prompt}", prompt)
    else:
        parts = filter(None, (prompt.strip(), style_prompt.strip()))
        res = ", ".join(parts)
    return res


def oracle_apply_styles_to_prompt(prompt, styles):
    for style in styles:
        prompt = oracle_merge_prompts(style, prompt)
    return prompt


def oracle_database_apply(db: dict, prompt: str, negative: str, names: list[str]) -> tuple[str, str]:
    """StyleDatabase.apply_styles_to_prompt / apply_negative_styles_to_prompt: unknown names get its no_style."""
    no_style = PromptStyle("None", "", "")
    return (oracle_apply_styles_to_prompt(prompt, [db.get(x, no_style).prompt for x in names]),
            oracle_apply_styles_to_prompt(negative, [db.get(x, no_style).negative_prompt for x in names]))
# --- end of the oracle ------------------------------------------------------------------------------------------


DB = {s.name: s for s in [
    PromptStyle("wrap", "a photo of {prompt}, 35mm", "{prompt}, lowres"),
    PromptStyle("twice", "{prompt} and {prompt}", ""),
    PromptStyle("tail", "  oil painting ", "ugly, blurry"),
    PromptStyle("empty", "", ""),
    PromptStyle("lead", ", masterpiece", "  "),
    PromptStyle("bare", "{prompt}", "{prompt}{prompt}"),
]}
PROMPTS = ["a cat", "  a cat  ", "", " ", "a (cat:1.2), BREAK dog,", "{prompt}"]


def test_application_matches_a1111_merge_prompts():
    names = [*DB, "unknown"]
    cases = 0
    for prompt, negative in itertools.product(PROMPTS, ["", " blurry "]):
        for n in range(4):
            for chosen in itertools.permutations(names, n):
                got_p, got_n, unknown = apply_styles(DB, list(chosen), prompt, negative)
                assert (got_p, got_n) == oracle_database_apply(DB, prompt, negative, list(chosen)), (prompt, chosen)
                assert unknown == [c for c in chosen if c == "unknown"]
                cases += 1
    assert cases > 2000
    # the rules spelled out once
    assert apply_styles(DB, ["wrap", "tail"], "a cat", "")[:2] == ("a photo of a cat, 35mm, oil painting",
                                                                   ", lowres, ugly, blurry")  # (A1111 leaves the comma)
    assert apply_styles(DB, ["tail", "wrap"], "a cat", "x")[:2] == ("a photo of a cat, oil painting, 35mm",
                                                                    "x, ugly, blurry, lowres")


def _write(path, text: str, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return str(path)


def test_reading_a1111_csv_quotes_commas_bom_empty_rows_comments_duplicates(tmp_path):
    text = ('\ufeffname, prompt, negative_prompt\r\n'
            '"comma, name","{prompt}, in the style of ""Ink"", high detail","blurry, lowres"\r\n'
            '\r\n'
            ',,\r\n'
            '# a comment,x,y\r\n'
            'multi,"line one\r\nline two",\r\n'
            'spaced,  oil painting,   ugly\r\n'
            'short\r\n'
            '"comma, name",later,\r\n')
    styles, notes = read_styles(_write(tmp_path / "styles.csv", text))
    assert list(styles) == ["comma, name", "multi", "spaced", "short"]  # A1111's dict: the first one's place
    assert styles["comma, name"] == PromptStyle("comma, name", "later", "")  # ... the later one's text
    assert styles["multi"].prompt == "line one\r\nline two"
    assert styles["spaced"] == PromptStyle("spaced", "oil painting", "ugly")  # skipinitialspace, as A1111
    assert styles["short"] == PromptStyle("short", "", "")
    assert len(notes) == 1 and "'comma, name'" in notes[0] and "later one wins" in notes[0]
    assert "line 2" in notes[0] and "line 10" in notes[0], notes
    # the first definition, without the duplicate: quotes and commas inside fields kept
    first, _ = read_styles(_write(tmp_path / "one.csv", text.rsplit('"comma, name",later', 1)[0]))
    assert first["comma, name"] == PromptStyle("comma, name", '{prompt}, in the style of "Ink", high detail',
                                               "blurry, lowres")
    # A1111's old header name,text; no negative_prompt column
    old, _ = read_styles(_write(tmp_path / "old.csv", "name,text\nsketch,pencil sketch\n"))
    assert old == {"sketch": PromptStyle("sketch", "pencil sketch", "")}


def test_reading_a_folder_of_csvs_in_order(tmp_path):
    _write(tmp_path / "b.csv", "name,prompt,negative_prompt\nboth,from b,\nonly_b,b,\n")
    _write(tmp_path / "a.csv", "name,prompt,negative_prompt\nonly_a,a,\nboth,from a,\n")
    _write(tmp_path / "notes.txt", "name,prompt\nnot,read\n")
    styles, notes = read_styles(str(tmp_path))
    assert list(styles) == ["only_a", "both", "only_b"] and styles["both"].prompt == "from b"
    assert len(notes) == 1 and "b.csv" in notes[0]


@pytest.mark.parametrize("make, words", [
    (lambda d: str(d / "nope.csv"), "nope.csv: no such file"),
    (lambda d: str(d), "a folder with no .csv file in it"),
    (lambda d: _write(d / "s.csv", "title,prompt\nx,y\n"), "no 'name' column"),
    (lambda d: _write(d / "s.csv", ""), "no 'name' column"),
    (lambda d: _write(d / "s.csv", "name,negative_prompt\nx,y\n"), "no 'prompt' column"),
    (lambda d: _write(d / "s.csv", "name,prompt\ncafé,x\n", "latin-1"), "not UTF-8 text"),
])
def test_reading_errors_are_one_line(tmp_path, make, words):
    with pytest.raises(StylesError) as e:
        read_styles(make(tmp_path))
    assert words in str(e.value) and str(e.value).startswith("--styles-file ") and "\n" not in str(e.value)


STYLES = "name,prompt,negative_prompt\nframed,\"a photo of {prompt}, 35mm\",\"blurry, lowres\"\nplain,oil painting,ugly\n"
TINY = ["--model", "random:tiny", "--steps", "1", "--width", "64", "--height", "64", "--no-progress", "--threads", "1"]


def test_cli_writes_the_styled_prompts_in_the_infotext(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTSD_STYLES", _write(tmp_path / "styles.csv", STYLES))  # the default --styles-file
    out = tmp_path / "styled.png"
    assert main(["a cat", "--negative-prompt", "text", "--style", "framed", "--style", "plain", *TINY,
                 "--out", str(out)]) == 0, capsys.readouterr().err
    with Image.open(out) as im:
        prompt, negative, params = parse_infotext(im.text["parameters"])
    assert (prompt, negative) == ("a photo of a cat, 35mm, oil painting", "text, blurry, lowres, ugly")
    assert not any("style" in k.lower() for k in params)  # A1111 writes no Styles key by default


def _settings(argv):
    args = build_parser().parse_args(argv)
    return args, GenerationSettings(**{name: getattr(args, name) for name in FIELDS})


def test_cli_styles_the_hires_prompts_when_given(tmp_path):
    path = _write(tmp_path / "styles.csv", STYLES)
    args, s = _settings(["a cat", "--styles-file", path, "--style", "plain", "--hires-scale", "2",
                         "--hires-prompt", "a dog", "--hires-negative-prompt", "bad"])
    got = apply_cli_styles(args, s)
    assert (got.prompt, got.hires_prompt, got.hires_negative_prompt) == ("a cat, oil painting", "a dog, oil painting",
                                                                         "bad, ugly")
    args, s = _settings(["a cat", "--styles-file", path, "--style", "plain", "--hires-scale", "2"])
    assert apply_cli_styles(args, s).hires_prompt == ""  # "" stays the (styled) prompt's, as A1111's


@pytest.mark.parametrize("extra, words", [
    (["--style", "framed", "--style", "nope"], "--style 'nope': no such style in $FASTSD_STYLES"),
    (["--style", "plain", "--styles-file", "missing.csv"], "--styles-file missing.csv: no such file"),
])
def test_cli_bad_style_is_one_line_exit_2_nothing_written(tmp_path, monkeypatch, capsys, extra, words):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FASTSD_STYLES", _write(tmp_path / "styles.csv", STYLES))
    out = tmp_path / "out"
    assert main(["a cat", *TINY, "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and words in err, err
    assert not out.exists()


def test_cli_style_without_a_styles_file(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("FASTSD_STYLES", raising=False)
    assert main(["a cat", *TINY, "--out", str(tmp_path / "out"), "--style", "plain"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --style plain: no styles file") and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def client():
    with styles_server().client() as c:
        yield c


SMALL = {"prompt": "a cat", "steps": 1, "width": 64, "height": 64}


def test_server_lists_its_styles_in_a1111_shape(client):
    assert client.get("/sdapi/v1/prompt-styles").json() == [  # a.csv then b.csv; b's "dup" wins in a's place
        {"name": "framed", "prompt": "a photo of {prompt}, 35mm", "negative_prompt": "blurry, lowres"},
        {"name": "inked", "prompt": "ink drawing <lora:detail:0.5>", "negative_prompt": ""},
        {"name": "dup", "prompt": "second", "negative_prompt": ""},
        {"name": "plain", "prompt": "oil painting", "negative_prompt": "ugly"},
    ]


def test_server_applies_styles_and_warns_of_unknown_ones(client):
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "styles": ["framed", "Cinematic", "plain"]})
    assert r.status_code == 200, r.text
    meta = info(r)
    prompt, negative, _ = parse_infotext(meta["infotexts"][0])
    assert (prompt, negative) == ("a photo of a cat, 35mm, oil painting", "blurry, lowres, ugly")
    assert meta["prompt"] == prompt and meta["negative_prompt"] == negative  # info has the final prompts (A1111's)
    assert meta["styles"] == ["framed", "Cinematic", "plain"]
    assert r.json()["parameters"]["prompt"] == "a cat"  # the request echoed as sent, as A1111's
    assert [w for w in meta["warnings"] if "styles" in w] == [
        "styles: 'Cinematic': not a style of this server (GET /sdapi/v1/prompt-styles lists them), ignored"]


def test_server_reads_lora_tags_of_a_style(client):
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "styles": ["inked"]})
    assert r.status_code == 422  # the style's <lora:detail:0.5> asked for detail.safetensors, an empty file
    assert "detail.safetensors" in r.json()["detail"], r.text
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "styles": ["inked"], "disable_extra_networks": True})
    assert r.status_code == 200, r.text
    assert parse_infotext(info(r)["infotexts"][0])[0].rstrip() == "a cat, ink drawing"


def test_server_without_styles_warns_of_each_name():
    req = Txt2ImgRequest(prompt="a cat", styles=["a", "b"])
    warnings = []
    assert _apply_styles(req, {}, warnings) == {"prompt": "a cat", "negative_prompt": ""}
    assert warnings == ["styles: 'a', 'b': this server has no styles (--styles-file), ignored"]
    assert req.prompt == "a cat"
