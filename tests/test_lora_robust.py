"""LoRA loads and unloads that stop or fail halfway: an interrupted unload_loras, a merge for good
(keep_originals=False) whose values overflow, and the items load_loras takes."""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_lora import _lycoris, assert_same_state, generate, state, tiny

from fastsd import lora
from fastsd.lora import read_lora
from fastsd.testing_lora import write_random_lora


def _models(pipe) -> dict:
    return {"unet": pipe.unet, "clip": pipe.clip}


def _names(pipe) -> list:
    return [(x.name, x.weight) for x in pipe.loras]


def _flaky_replace_weight(monkeypatch, pipe, at: int, exc: type, every: bool = False, gap: bool = False) -> list:
    """pipe's backend.replace_weight raises `exc` at its `at`-th call (`every`: and at each call after it), as a Ctrl-C
    (or no memory) in the middle of unload_loras; `gap`: with the layer's weight taken out first, as a Ctrl-C landing
    inside the swap. Returns the list of calls so far."""
    backend, calls = pipe.backend, []
    real = backend.replace_weight

    def flaky(module, weight):
        calls.append(1)
        if len(calls) == at or (every and len(calls) > at):
            if gap:
                del module.weight
            raise exc("stopped")
        return real(module, weight)

    monkeypatch.setattr(backend, "replace_weight", flaky)
    return calls


@pytest.mark.parametrize("gap", [False, True], ids=["between layers", "inside a swap"])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_an_interrupted_unload_puts_every_weight_back(tmp_path, monkeypatch, backend, gap):
    """A Ctrl-C (any exception) in the middle of unload_loras (at the 5th layer) does not leave a half-restored model
    that still lists the LoRA: the layers left are put back before it goes on; the weights are the base model's bit
    for bit, pipe.loras is empty, the image is the one of before, and a second unload changes nothing."""
    pipe = tiny(backend)
    image0 = generate(pipe, steps=1)  # (cpu: weights packed)
    state0 = state(pipe)
    path = str(tmp_path / "a.safetensors")
    write_random_lora(path, pipe, fmt="kohya_ldm", rank=4, seed=1)
    pipe.load_lora(path, 0.8)
    generate(pipe, steps=1)  # (cpu: the merged weights packed)
    calls = _flaky_replace_weight(monkeypatch, pipe, 5, KeyboardInterrupt, gap=gap)
    with pytest.raises(KeyboardInterrupt):
        pipe.unload_loras()
    monkeypatch.undo()
    assert pipe.loras == []
    assert_same_state(pipe, state0)
    assert len(calls) > 5  # (it went on after the interrupt)
    assert np.array_equal(generate(pipe, steps=1), image0)
    pipe.unload_loras()
    assert_same_state(pipe, state0)
    pipe.load_lora(path, 0.8)  # and the LoRA loads again as usual
    assert _names(pipe) == [("a", 0.8)]


def test_an_unload_that_cannot_finish_refuses_to_generate_until_called_again(tmp_path, monkeypatch):
    """When putting the rest back fails too (the failure persists), the model is never used half-restored: generate
    and load_lora refuse, naming unload_loras, until an unload_loras puts back the layers left."""
    pipe = tiny()
    image0 = generate(pipe, steps=1)
    state0 = state(pipe)
    path = str(tmp_path / "a.safetensors")
    write_random_lora(path, pipe, fmt="kohya_ldm", rank=4, seed=1)
    pipe.load_lora(path, 0.8)
    _flaky_replace_weight(monkeypatch, pipe, 5, RuntimeError, every=True)
    with pytest.raises(RuntimeError, match="stopped"):
        pipe.unload_loras()
    monkeypatch.undo()
    for call in (lambda: generate(pipe, steps=1), lambda: pipe.load_lora(path)):
        with pytest.raises(ValueError, match=r"unload_loras stopped \(RuntimeError\) .*: call unload_loras again"):
            call()
    pipe.unload_loras()
    assert pipe.loras == []
    assert_same_state(pipe, state0)
    assert np.array_equal(generate(pipe, steps=1), image0)


def _overflowing_last_layer(pipe, good: str, path: str, what: str) -> tuple[str, float]:
    """`good` with its last layer made to overflow (the layers before it merge first): its factors 1e20 (`what`
    "weight": up @ down 4e40 at weight 1), or as LyCORIS 'full' with a bias change of 1e36 (`what` "bias": the last
    layer that has a bias, at weight 1000). Returns (the layer's key, the weight to load at)."""
    layers = read_lora(good, _models(pipe)).layers
    sd = load_file(good)
    if what == "weight":
        key = layers[-1].key
        for part in ("lora_down.weight", "lora_up.weight"):
            sd[f"{key}.{part}"] = torch.full_like(sd[f"{key}.{part}"], 1e20)
        weight = 1.0
    else:
        layer = [x for x in layers if _models(pipe)[x.model].get_submodule(x.module).bias is not None][-1]
        key, module = layer.key, _models(pipe)[layer.model].get_submodule(layer.module)
        sd = {k: v for k, v in sd.items() if not k.startswith(key + ".")}
        sd |= {f"{key}.diff": torch.zeros(module.weight.shape), f"{key}.diff_b": torch.full(module.bias.shape, 1e36)}
        weight = 1000.0
    assert layers.index(next(x for x in layers if x.key == key)) > 0
    save_file(sd, path)
    return key, weight


@pytest.mark.parametrize("backend, dtype, what", [
    ("torch", "fp32", "weight"), ("torch", "fp16", "weight"), ("torch", "bf16", "weight"), ("cpu", "fp32", "weight"),
    ("torch", "fp32", "bias")])
def test_a_merge_for_good_that_overflows_changes_no_weight(tmp_path, backend, dtype, what):
    """keep_originals=False keeps no original to put back, so a file whose merge leaves the dtype's range, even in its
    last layer, fails before any weight changes (as a bad file does): the model is the one of before, bit for bit,
    generates as before, and takes a good file for good afterwards."""
    pipe, ref = tiny(backend, dtype), tiny(backend, dtype)
    image0 = generate(pipe, steps=1)  # (cpu: weights packed)
    state0 = state(pipe)
    good, path = str(tmp_path / "good.safetensors"), str(tmp_path / "huge.safetensors")
    write_random_lora(good, pipe, fmt="kohya_ldm", rank=4, alpha=2.0, seed=1)
    key, weight = _overflowing_last_layer(pipe, good, path, what)
    what = "weights" if what == "weight" else what
    with pytest.raises(ValueError, match=f"LoRA huge: {key} at weight {weight:g} takes the layer's {what} out of "
                                         f"{str(pipe.dtype)[6:]}'s range") as e:
        pipe.load_lora(path, weight, keep_originals=False)
    assert "\n" not in str(e.value)
    assert pipe.loras == []
    assert_same_state(pipe, state0)
    assert np.array_equal(generate(pipe, steps=1), image0)
    pipe.load_lora(good, 0.5, keep_originals=False)
    ref.load_lora(good, 0.5)
    assert _names(pipe) == [("good", 0.5)]
    assert_same_state(pipe, state(ref))


def test_load_loras_takes_any_iterable_of_items_and_refuses_other_shapes(tmp_path):
    """Items come as a list, tuple, generator, zip or map (an iterator read once); a string, a dict, None, or an item
    that is not a (path, weight) or (path, weight, name) tuple or list is a one-line TypeError naming load_loras and
    the item, before any weight changes."""
    pipe, ref = tiny(), tiny()
    paths = [str(tmp_path / f"{i}.safetensors") for i in range(2)]
    write_random_lora(paths[0], pipe, fmt="kohya_ldm", rank=4, seed=1)
    write_random_lora(paths[1], pipe, fmt="kohya_ldm", rank=4, seed=2, text_encoder=False)
    state0 = state(pipe)
    weights = [0.5, (1.0, 0.25)]
    ref.load_loras(list(zip(paths, weights)))
    for items in ((p for p in zip(paths, weights)), zip(paths, weights), map(lambda p, w: [p, w], paths, weights),
                  iter(list(zip(paths, weights))), tuple(zip(paths, weights))):
        pipe.load_loras(items)
        assert _names(pipe) == [("0", 0.5), ("1", (1.0, 0.25))]
        assert_same_state(pipe, state(ref))
        pipe.unload_loras()
    pipe.load_loras([(paths[0], 0.5, "first"), [paths[1], (1.0, 0.25), "second"]])
    assert _names(pipe) == [("first", 0.5), ("second", (1.0, 0.25))]
    assert_same_state(pipe, state(ref))
    pipe.unload_loras()
    for items, shown in ((paths[0], "got a string: '"), ([paths[0]], "got str: '"), ([(paths[0],)], "got 1 items: ("),
                         ([(paths[0], 1.0, "n", 4)], "got 4 items: ("), ({paths[0]: 1.0}, "got a dict: {"),
                         (None, "got NoneType: None"), (3, "got int: 3"), ([(paths[0], 1.0), None], "got NoneType"),
                         ([(paths[0], 1.0), {"path": paths[0]}], "got dict: {'path'")):
        with pytest.raises(TypeError, match=r"^load_loras") as e:
            pipe.load_loras(items)
        assert "\n" not in str(e.value) and shown in str(e.value), str(e.value)
    assert pipe.loras == []
    assert_same_state(pipe, state0)


def test_numpy_weights_are_python_numbers(tmp_path):
    """LoRA weights and keep_originals given as numpy's scalars merge as the Python numbers they stand for (the same
    bits; pipe.loras and the infotext hold Python floats); a bool weight (np.bool_ too) is refused as before."""
    pipe, ref = tiny(), tiny()
    paths = [str(tmp_path / f"{i}.safetensors") for i in range(2)]
    write_random_lora(paths[0], pipe, fmt="kohya_ldm", rank=4, seed=1)
    write_random_lora(paths[1], pipe, fmt="kohya_ldm", rank=4, seed=2)
    state0 = state(pipe)
    ref.load_loras([(paths[0], 0.5), (paths[1], (1.0, 0.0))])
    pipe.load_lora(paths[0], weight=np.float32(0.5))
    pipe.load_loras([(paths[1], (np.float16(1.0), np.int64(0)))], keep_originals=np.True_)
    assert_same_state(pipe, state(ref))
    assert [(type(x.weight), type(x.weight[0]) if isinstance(x.weight, tuple) else None) for x in pipe.loras] == \
        [(float, None), (tuple, float)] and _names(pipe) == [("0", 0.5), ("1", (1.0, 0.0))]
    pipe.unload_loras()
    assert_same_state(pipe, state0)
    with pytest.raises(ValueError, match="LoRA weight must be a finite number or a"):
        pipe.load_lora(paths[0], weight=np.True_)
    with pytest.raises(TypeError, match="keep_originals must be True or False, got 1"):
        pipe.load_lora(paths[0], keep_originals=np.int64(1))
    assert pipe.loras == []
    assert_same_state(pipe, state0)


@pytest.mark.parametrize("kind", ["loha", "lokr", "full"])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_a_lycoris_merge_for_good_computes_each_change_once(tmp_path, monkeypatch, backend, kind):
    """keep_originals=False checks first, changing no weight, the merges that may leave the range; a LyCORIS layer of
    sane factors is ruled out by a bound on its change, so its change is computed once (not once to check and once
    to merge), with the bits of a keep_originals=True load; one that overflows still fails before any weight
    changes."""
    from safetensors.torch import save_file

    pipe, ref = tiny(backend), tiny(backend)
    generate(pipe, steps=1)  # (cpu: weights packed)
    state0 = state(pipe)
    targets = [("unet", "input_blocks.1.0.in_layers.2"), ("unet", "input_blocks.1.1.proj_in"),
               ("clip", "text_model.encoder.layers.0.mlp.fc1")]
    if kind == "full":
        g = torch.Generator().manual_seed(3)
        sd = {("lora_unet_" if m == "unet" else "lora_te_") + n.replace(".", "_") + ".diff":
              torch.randn(_models(pipe)[m].get_submodule(n).weight.shape, generator=g) * 0.1 for m, n in targets}
    else:
        sd, _ = _lycoris(pipe, kind, targets, torch.Generator().manual_seed(3))
    good, huge = str(tmp_path / "good.safetensors"), str(tmp_path / "huge.safetensors")
    save_file(sd, good)
    if kind != "full":  # (a 'full' file's change can't leave fp32's range: its sums, checked as it is read, would)
        last = [k for k in sd if k.startswith("lora_te_") and not k.endswith("alpha")]  # (products of 1e20s: inf)
        save_file({**sd, **{k: torch.full_like(sd[k], 1e20) for k in last}}, huge)
        with pytest.raises(ValueError, match="LoRA huge: lora_te_.* takes the layer's weights out of float32's"):
            pipe.load_lora(huge, 1.0, keep_originals=False)
        assert pipe.loras == []
        assert_same_state(pipe, state0)
    calls = []
    real = lora.LoraLayer.delta
    monkeypatch.setattr(lora.LoraLayer, "delta", lambda self, w: calls.append(self.key) or real(self, w))
    pipe.load_lora(good, 0.7, keep_originals=False)
    assert len(calls) == len(targets), calls
    ref.load_lora(good, 0.7)
    assert_same_state(pipe, state(ref))
