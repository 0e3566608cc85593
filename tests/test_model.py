"""model.py: presets, Hugging Face interop, KV-cache generation, checkpoints."""

import datetime
import itertools
import json
import logging
import math
import re
import socket
import unittest.mock
from dataclasses import replace
from types import SimpleNamespace

import pytest
import requests
import safetensors.torch
import torch
import transformers

import model as model_module
import tokenizer
from config import UserError
from model import (GPT, GPTConfig, KVCache, PRESETS, config_from_dict, config_from_hf, derived_seed, load_checkpoint,
                   load_for_tokens, load_model, pick_device, pick_dtype, read_safetensors, sample, write_safetensors)

SMALL = GPTConfig(n_layer=2, n_head=2, n_embd=128, block_size=64, vocab_size=512)
ONE_LAYER = GPTConfig(n_layer=1, n_head=2, n_embd=128, block_size=64)  # full vocabulary


def small_model(seed=0, config=SMALL):
    torch.manual_seed(seed)
    model = GPT(config).eval()
    with torch.no_grad():  # biases and LayerNorms away from their init, so the test sees them
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def hf_phi(config: GPTConfig):
    """transformers' PhiForCausalLM, its biases and LayerNorms moved off their init
    (zeros and ones would hide a bias or a LayerNorm that import drops)."""
    hf_config = transformers.PhiConfig(
        vocab_size=config.vocab_size, hidden_size=config.n_embd, intermediate_size=4 * config.n_embd,
        num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
        max_position_embeddings=config.block_size, partial_rotary_factor=config.rotary_dim / config.head_dim,
        rope_theta=config.rope_base, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0,
        hidden_act="gelu_new", layer_norm_eps=config.layer_norm_eps, tie_word_embeddings=False)
    hf_config._attn_implementation = "eager"
    model = transformers.PhiForCausalLM(hf_config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name, low, high", [("phi-1", 1.3e9, 1.45e9), ("phi-1-small", 3.4e8, 3.6e8)])
def test_preset_parameter_counts(name, low, high):
    """The paper's 1.3B and 350M models; the exact figures are those of the hub's phi-1."""
    c = PRESETS[name]
    with torch.device("meta"):
        n = GPT(c).num_params()
    d, L, V = c.n_embd, c.n_layer, c.vocab_size
    per_layer = 2 * d + (d * 7 * d + 7 * d) + (5 * d * d + 2 * d)
    assert n == 2 * V * d + V + L * per_layer + 2 * d
    assert low < n < high
    if name == "phi-1":
        assert n == 1_418_270_720


@pytest.mark.parametrize("config", [
    SMALL,  # phi-1's heads: rotary on 32 of 64 dims
    GPTConfig(n_layer=1, n_head=2, n_embd=160, block_size=64, vocab_size=512),  # phi-2's: 32 of 80
    GPTConfig(n_layer=1, n_head=4, n_embd=128, block_size=64, vocab_size=512, rotary_dim=32),  # all 32
], ids=["rotary-32-of-64", "rotary-32-of-80", "rotary-32-of-32"])
def test_hf_import_gives_transformers_logits(config):
    hf = hf_phi(config)
    ours = GPT.from_hf_state_dict(hf.state_dict(), config).eval()
    idx = torch.randint(0, config.vocab_size, (2, 37))
    with torch.no_grad():
        expected = hf(idx).logits
        logits, _ = ours(idx)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_hf_export_round_trip_and_transformers_logits():
    ours = small_model()
    exported = ours.to_hf_state_dict()
    hf = hf_phi(SMALL)
    missing, unexpected = hf.load_state_dict(exported, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    idx = torch.randint(0, SMALL.vocab_size, (3, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf(idx).logits, rtol=1e-5, atol=1e-5)
    back = GPT.from_hf_state_dict(exported).to_hf_state_dict()  # config read from shapes
    assert back.keys() == exported.keys()
    assert all(torch.equal(back[k], exported[k]) for k in exported)


def test_a_half_precision_state_dict_loads_as_it_is_sharing_its_memory():
    """A bf16 phi-1 (2.6 GB) copied to float32 would take three times its memory."""
    state = {k: v.to(torch.bfloat16) for k, v in small_model(seed=2).to_hf_state_dict().items()}
    model = GPT.from_hf_state_dict(state)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.lm_head.weight.data_ptr() == state["lm_head.weight"].data_ptr()


def test_derived_seeds_are_below_2_to_the_31():
    seeds = [derived_seed(1337, f"HumanEval/{i}", j) for i in range(200) for j in range(5)]
    assert max(seeds) < 2**31 and len(set(seeds)) == len(seeds)


def test_save_pretrained_loads_in_transformers_and_back(tmp_path):
    ours = small_model(seed=1)
    ours.config.dropout = 0.1  # training's dropout travels in config.json (eval mode: logits unchanged)
    ours.save_pretrained(tmp_path)
    hf = transformers.PhiForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    reloaded = GPT.from_pretrained(str(tmp_path))
    assert hf.config.resid_pdrop == hf.config.attention_dropout == reloaded.config.dropout == 0.1
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "float32"
    small_model().to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    idx = torch.randint(0, SMALL.vocab_size, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx)[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(reloaded(idx)[0], ours(idx)[0])


def test_a_transformers_saved_folder_loads_with_its_rotary_settings(tmp_path):
    """transformers 5 nests partial_rotary_factor and rope_theta under rope_parameters."""
    config = GPTConfig(n_layer=1, n_head=2, n_embd=160, block_size=64, vocab_size=512, rope_base=500.0)
    hf = hf_phi(config)
    hf.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(str(tmp_path))
    assert (ours.config.rotary_dim, ours.config.rope_base, ours.training) == (32, 500.0, False)
    idx = torch.randint(0, config.vocab_size, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf(idx).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change, message", [
    (dict(qk_layernorm=True), "qk_layernorm"), (dict(hidden_act="relu"), "hidden_act"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 4.0}), "scaled rotary"),
    (dict(num_key_value_heads=1), "grouped-query"), (dict(model_type="phi-msft"), "model_type"),
])
def test_phi_variants_this_model_is_not_are_refused(tmp_path, change, message):
    small_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=message):
        GPT.from_pretrained(str(tmp_path))
    state = small_model().to_hf_state_dict()
    state["model.layers.0.self_attn.q_layernorm.weight"] = torch.ones(64)
    with pytest.raises(ValueError, match="q_layernorm.weight .* has no place"):
        GPT.from_hf_state_dict(state, SMALL)


def test_safetensors_files_that_are_not_weights_are_named(tmp_path):
    good = tmp_path / "good.safetensors"
    write_safetensors(good, {"w": torch.randn(100, 10), "u": torch.arange(6).to(torch.uint16)})
    assert read_safetensors(good)["u"].tolist() == list(range(6))
    cases = {"lfs.safetensors": b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 9\n",
             "short.safetensors": b"\x01\x02", "cut.safetensors": good.read_bytes()[:2000]}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=f"{name}.*(git-lfs|truncated)"):
            read_safetensors(tmp_path / name)


def shard(folder, tensors):
    """Save tensors as a two-shard checkpoint in folder: its index and shards."""
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for name, part in shards.items():
        write_safetensors(folder / name, {n: tensors[n] for n in part})
    index = {"weight_map": {n: name for name, part in shards.items() for n in part}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def test_a_sharded_folder_loads_the_shards_its_index_names(tmp_path):
    ours = small_model(seed=4)
    ours.save_pretrained(tmp_path)
    tensors = read_safetensors(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    shard(tmp_path, tensors)
    write_safetensors(tmp_path / "stale.safetensors", {"lm_head.bias": torch.zeros(SMALL.vocab_size)})
    loaded = GPT.from_pretrained(str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), ours.state_dict().values()))


def test_an_export_over_a_sharded_checkpoint_replaces_it(tmp_path):
    """save_pretrained into a folder that held a sharded checkpoint: the stale index and the
    shards it names go (nothing else), and the folder loads the new weights here and in transformers."""
    old, new = small_model(seed=1), small_model(seed=2)
    old.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    shard(tmp_path, old.to_hf_state_dict())
    (tmp_path / "notes.safetensors").write_bytes(b"not named by the index")
    new.save_pretrained(tmp_path)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["config.json", "model.safetensors", "notes.safetensors"]
    idx = torch.randint(0, SMALL.vocab_size, (1, 20))
    hf = transformers.PhiForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        assert torch.equal(GPT.from_pretrained(str(tmp_path))(idx)[0], new(idx)[0])
        torch.testing.assert_close(hf(idx).logits, new(idx)[0], rtol=1e-5, atol=1e-5)
    # a folder holding both (written by another tool): model.safetensors wins, as in transformers
    shard(tmp_path, old.to_hf_state_dict())
    assert torch.equal(GPT.from_pretrained(str(tmp_path)).lm_head.weight, new.lm_head.weight)


def test_a_downloaded_model_loads_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("PHI1_CACHE", str(tmp_path))
    ours = small_model(seed=2)
    ours.save_pretrained(tmp_path / "hub" / "someone" / "phi-tiny")  # what a finished download leaves

    def offline(*args, **kwargs):
        raise requests.ConnectionError("no network")
    monkeypatch.setattr(requests, "get", offline)
    loaded = GPT.from_pretrained("someone/phi-tiny")
    assert torch.equal(loaded.lm_head.weight, ours.lm_head.weight)
    weights = tmp_path / "hub" / "someone" / "phi-tiny" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])  # damaged in the cache: it would fail for ever
    with pytest.raises(ValueError, match=f"is truncated: .*; remove {re.escape(str(weights.parent))} to download it"):
        GPT.from_pretrained("someone/phi-tiny")
    head = json.dumps({"lm_head.bias": {"dtype": "F8_E8M0", "shape": [4], "data_offsets": [0, 4]}}).encode()
    weights.write_bytes(len(head).to_bytes(8, "little") + head + bytes(4))  # whole: a download would be the same
    with pytest.raises(ValueError, match="which this reader does not take$"):
        GPT.from_pretrained("someone/phi-tiny")


def test_safetensors_reader_matches_the_reference_library(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64),
               "c": torch.randn(4, 2).to(torch.bfloat16), "d": torch.randn(2).half()}
    safetensors.torch.save_file(tensors, tmp_path / "x.safetensors")
    got = read_safetensors(tmp_path / "x.safetensors")
    assert got.keys() == tensors.keys()
    assert all(torch.equal(got[k], tensors[k]) and got[k].dtype == tensors[k].dtype for k in tensors)
    # and what we write carries the format, which transformers before 4.48 reads without a check for None
    write_safetensors(tmp_path / "y.safetensors", tensors)
    with safetensors.safe_open(tmp_path / "y.safetensors", "pt") as written:
        assert written.metadata() == {"format": "pt"}
        assert all(torch.equal(written.get_tensor(k), tensors[k]) for k in tensors)


def test_cached_decoding_gives_the_logits_of_a_full_forward():
    model = small_model(seed=2)
    idx = torch.randint(0, SMALL.vocab_size, (2, 24))
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache(SMALL, 2, 24, "cpu", torch.float32)
        steps = [model.lm_head(model.hidden_states(idx[:, :10], torch.arange(10), cache))]
        # a chunk of 5 (fewer queries than keys: the causal mask aligned to the end), then one at a time
        steps.append(model.lm_head(model.hidden_states(idx[:, 10:15], torch.arange(10, 15), cache)))
        for t in range(15, 24):
            steps.append(model.lm_head(model.hidden_states(idx[:, t:t + 1], torch.arange(t, t + 1), cache)))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_fixed_shape_decoding_steps_give_the_logits_of_a_full_forward():
    # generate()'s decoding steps (the ones a GPU replays as a CUDA graph): each
    # writes one position of the cache and attends over all of it under a mask
    model = small_model(seed=2)
    idx = torch.randint(0, SMALL.vocab_size, (2, 24))
    keys = torch.arange(24)
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache(SMALL, 2, 24, "cpu", torch.float32)
        steps = [model.lm_head(model.hidden_states(idx[:, :10], torch.arange(10), cache))]
        cache.slot = torch.zeros(1, dtype=torch.long)
        for t in range(10, 24):
            cache.slot.fill_(t)
            mask = (keys <= cache.slot).expand(2, 1, 1, 24)
            steps.append(model.lm_head(model.hidden_states(idx[:, t:t + 1], cache.slot, cache, mask)))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def greedy_reference(model, prompt, n):
    """Greedy decoding by re-running the whole sequence each step, no cache, no batch."""
    ids = list(prompt)
    for _ in range(n):
        logits, _ = model(torch.tensor([ids]))
        logits[0, -1, tokenizer.VOCAB_SIZE:] = -float("inf")
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_batched_generation_with_padding_equals_one_prompt_at_a_time():
    config = GPTConfig(n_layer=2, n_head=2, n_embd=128, block_size=64)  # full vocabulary
    model = small_model(seed=3, config=config)
    # large logits so greedy choices are not decided by float noise
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    prompts = [[5, 17, 300, 42, 9], [7], [1000, 2000, 3000]]
    batched = model.generate(prompts, max_new_tokens=8)
    for prompt, out in zip(prompts, batched):
        assert out == greedy_reference(model, prompt, 8)
        assert model.generate([prompt], max_new_tokens=8) == [out]



@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second CUDA GPU")
def test_generation_on_a_gpu_that_is_not_the_current_one():
    """The decoding step's CUDA graph was captured on the current device's streams (cuda:0)
    for a model on cuda:1 (sample.py --device=cuda:1)."""
    config = GPTConfig(n_layer=2, n_head=2, n_embd=128, block_size=64)  # full vocabulary
    model = small_model(seed=3, config=config)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # greedy choices not decided by float noise
    prompts = [[5, 17, 300, 42, 9], [7]]
    expected = model.generate(prompts, max_new_tokens=8)
    assert torch.cuda.current_device() == 0
    assert model.to("cuda:1").generate(prompts, max_new_tokens=8) == expected


def test_generation_under_autocast_and_with_no_new_tokens(monkeypatch):
    # train.py samples from its float32 model under bf16 autocast: the cache then holds
    # bf16 like q, so attention gets one dtype (the Triton kernel refuses a mix)
    model = small_model(seed=5, config=ONE_LAYER)
    seen, attend = set(), model_module.attend
    monkeypatch.setattr(model_module, "attend", lambda q, k, v, *a, **kw: seen.add((q.dtype, k.dtype, v.dtype))
                        or attend(q, k, v, *a, **kw))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.generate([[1, 2, 3], [4]], max_new_tokens=6)
    assert [len(o) for o in out] == [6, 6]
    assert seen == {(torch.bfloat16,) * 3}
    assert model.generate([[1, 2]], max_new_tokens=0) == [[]]


def test_generation_stops_at_stop_strings_eot_and_max_tokens(monkeypatch):
    model = small_model(seed=4, config=ONE_LAYER)
    newline, word = tokenizer.encode("\n")[0], tokenizer.encode("def")[0]

    def script(tokens):  # every row "says" the next token of the script
        tokens = itertools.cycle(tokens)
        return lambda logits, *args: torch.full((logits.shape[0],), next(tokens))

    monkeypatch.setattr(model_module, "sample", script([newline, word]))
    out = model.generate([[1, 2], [3]], max_new_tokens=10, stop=["\ndef"])
    assert [tokenizer.decode(o) for o in out] == ["\ndef", "\ndef"]
    monkeypatch.setattr(model_module, "sample", script([newline, word]))
    assert len(model.generate([[1]], max_new_tokens=5)[0]) == 5
    monkeypatch.setattr(model_module, "sample", script([word, tokenizer.EOT]))
    assert model.generate([[1]], max_new_tokens=5) == [[word]]


def test_generation_fills_the_context_and_refuses_what_cannot_be(tmp_path):
    model = small_model(seed=3)  # context 64, vocabulary 512
    prompt = list(range(1, 61))
    full = model.generate([prompt], max_new_tokens=5)[0]  # 60 + 4 fed back = 64: the last is never fed
    assert len(full) == 5
    with torch.no_grad():  # the greedy tokens are those of full forwards
        for i, token in enumerate(full):
            assert int(model(torch.tensor([prompt + full[:i]]))[0][0, -1].argmax()) == token
    for prompts, n, message in [([prompt], 6, "exceeds the context of 64 by 1"), ([[1]], -1, ">= 0"),
                                ([[1]], 2.5, "an integer"), ([[1, 512]], 1, "token ids must be integers in"),
                                ([[3.7, 100.9]], 1, "token ids must be integers in"),  # were cut to 3, 100
                                ([1, 2, 3], 1, "a list of prompts"), (torch.tensor([[1, 2]]), 1, "a list of prompts"),
                                ([[1]], True, "an integer")]:  # were torch's errors, and True a budget of 1
        with pytest.raises(ValueError, match=message):
            model.generate(prompts, n)
    for seed in (1.5, "7"):
        with pytest.raises(ValueError, match="seed must be an integer or None"):
            model.generate([[1]], 2, 1.0, seed=seed)
    for temperature, top_p in [(-1.0, 1.0), (math.inf, 1.0), (math.nan, 1.0), (1.0, 2.0), (1.0, math.nan)]:
        with pytest.raises(ValueError, match="temperature must be finite and >= 0, top_p in"):
            model.generate([[1]], 2, temperature, top_p)  # -1 was greedy without a word, inf a torch error
    assert len(model.generate([[1]], 3, stop=["\ud800"])[0]) == 3  # can never match; no crash
    for temperature in (1e39, 1e300):  # inf in float32: the padding rows' -inf / inf was nan, a torch error
        tokens = small_model(config=ONE_LAYER).generate([[1]], 4, temperature, seed=0)[0]
        assert len(tokens) == 4 and all(0 <= t < tokenizer.VOCAB_SIZE for t in tokens)
    with pytest.raises(ValueError, match=r"the longest prompt \(60 tokens\) \+ the largest max_new_tokens \(6\)"):
        model.generate([prompt, [1]], [1, 6])  # each row fits alone, not in one cache
    path = tmp_path / "dropout.pt"
    torch.save({"model": GPT(PRESETS["nano"]).state_dict(), "config": {**vars(PRESETS["nano"]), "dropout": 0.5}}, path)
    assert not GPT.from_checkpoint(path).training  # loaded models sample without dropout


def test_sampling_is_reproducible_and_top_p_keeps_the_nucleus():
    model = small_model(seed=5, config=ONE_LAYER)
    a = model.generate([[1, 2, 3]], 10, temperature=1.0, top_p=0.9, seed=7)
    b = model.generate([[1, 2, 3]], 10, temperature=1.0, top_p=0.9, seed=7)
    assert a == b
    for seed in (2**64 + 7, -2**64 + 7):  # any int, as it is taken modulo 2**64: a torch overflow error before
        assert model.generate([[1, 2, 3]], 10, temperature=1.0, top_p=0.9, seed=seed) == a
    logits = torch.tensor([[3.0, 2.9, -5.0, -6.0]])

    def draws(top_p):
        return {int(sample(logits, 1.0, top_p, torch.Generator().manual_seed(i))) for i in range(200)}

    assert draws(0.9) == {0, 1}  # the two likely tokens make up the nucleus, never the tail
    assert draws(0.5) == {0}  # token 0 alone holds more than half the mass
    assert int(sample(logits, 0.0, 1.0)) == 0
    assert draws(1e-320) == {0}  # 0 in float32: the most likely token still stays
    assert int(sample(logits, 1e-39, 1.0)) == int(sample(logits, float("nan"), 1.0)) == 0  # greedy


@pytest.mark.parametrize("temperature, share", [(0.5, 0.9), (1.0, 0.75), (2.0, 3 ** 0.5 / (1 + 3 ** 0.5))])
def test_temperature_sharpens_and_flattens(temperature, share):
    # odds of 3 to 1 at temperature 1 become 3**(1/T) to 1
    logits = torch.tensor([[0.0, math.log(3.0)]]).expand(4000, 2)
    drawn = sample(logits, temperature, 1.0, torch.Generator().manual_seed(0))
    assert abs(drawn.float().mean().item() - share) < 0.03  # 4 to 6 standard deviations of 4000 draws


def test_checkpoint_errors_are_clear(tmp_path):
    bad = tmp_path / "ckpt.pt"
    for content, message in ((b"\x80garbage", "not a readable checkpoint"), (b"", "is empty"),
                             (b"garbage\n", "not a file of tensors that torch.save wrote")):
        bad.write_bytes(content)
        with pytest.raises(ValueError, match=message) as error:
            load_checkpoint(bad)
        assert "\n" not in str(error.value) and "weights_only" not in str(error.value)  # one line, no unsafe advice
    torch.save({"weights": 1}, bad)
    with pytest.raises(ValueError, match="not a phi1 checkpoint"):
        load_checkpoint(bad)
    torch.save({"model": small_model().state_dict(), "config": vars(SMALL)}, bad)
    # a file this user may not read (mode 000; root reads anything): zipfile.is_zipfile says False for it too
    with unittest.mock.patch.object(torch, "load", side_effect=PermissionError(13, "Permission denied")), \
            unittest.mock.patch.object(model_module.zipfile, "is_zipfile", return_value=False):
        with pytest.raises(ValueError, match=r"not a readable checkpoint \(PermissionError: "):  # not "cut short"
            load_checkpoint(bad)
    whole = bad.read_bytes()
    for cut in (100, len(whole) // 3, len(whole) - 10):  # torch's own words were cut at 200 characters, or Errno 22
        bad.write_bytes(whole[:cut])
        with pytest.raises(ValueError, match="not a whole file that torch.save wrote: cut short, damaged"):
            load_checkpoint(bad)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "folder.pt").mkdir()
    with pytest.raises(FileNotFoundError, match="folder.pt is a folder, not a checkpoint file"):
        GPT.from_pretrained(str(tmp_path / "folder.pt"))
    with pytest.raises(FileNotFoundError, match="no model named"):  # not the current folder's config.json
        GPT.from_pretrained("")
    with pytest.raises(ValueError, match="missing"):
        GPT.from_hf_state_dict({"foo": torch.zeros(1)})


def test_a_checkpoint_loads_its_weights_in_float32_whatever_they_were_saved_in(tmp_path):
    """The model is built on the meta device and takes the checkpoint's tensors (no random
    init first, 5 s of phi-1-small's load on two cores): it must come out whole, as before."""
    ours, path = small_model(seed=3), tmp_path / "ckpt.pt"
    torch.save({"model": {k: v.bfloat16() for k, v in ours.state_dict().items()}, "config": vars(SMALL)}, path)
    loaded = GPT.from_checkpoint(path)
    assert all(p.dtype == torch.float32 and p.requires_grad and p.device.type == "cpu" for p in loaded.parameters())
    assert torch.equal(loaded.rotary, ours.rotary) and not loaded.training
    assert all(torch.equal(a, b.bfloat16().float()) for a, b in zip(loaded.parameters(), ours.parameters()))
    idx = torch.randint(0, SMALL.vocab_size, (1, 20))
    with torch.no_grad():
        assert torch.isfinite(loaded(idx)[0]).all()


def test_weights_that_are_not_finite_are_refused_at_load(tmp_path):
    config = GPTConfig(n_layer=2, n_head=2, n_embd=128, block_size=64)  # full vocabulary: load_model needs it
    model, path = small_model(config=config), tmp_path / "ckpt.pt"
    with torch.no_grad():
        model.layers[1].in_proj.weight[3, 5] = 1e5  # fine in float32 and bfloat16, inf in float16
    torch.save({"model": model.state_dict(), "config": vars(config)}, path)
    cpu = torch.device("cpu")
    for dtype in (torch.float32, torch.bfloat16):
        assert load_model(str(path), cpu, dtype).layers[1].in_proj.weight.dtype == dtype
    with pytest.raises(UserError, match=r"layers\.1\.in_proj\.weight holds NaN or infinite values in torch.float16"):
        load_model(str(path), cpu, torch.float16)
    with torch.no_grad():
        model.lm_head.bias[0] = float("nan")
    torch.save({"model": model.state_dict(), "config": vars(config)}, path)
    with pytest.raises(UserError, match=r"--ckpt=.*ckpt\.pt: lm_head\.bias holds NaN"):
        load_model(str(path), cpu, torch.float32)


def test_a_mistyped_path_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("PHI1_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    for typo in ("out/ckpt", str(tmp_path / "nowhere" / "model"), "./phi-1", "a/b/c", tmp_path / "a" / "b"):
        with pytest.raises(FileNotFoundError, match="no such checkpoint or folder"):
            GPT.from_pretrained(typo)
    with pytest.raises(ValueError, match="not a readable checkpoint"):  # a file is read as a checkpoint
        GPT.from_pretrained("notes.txt")
    assert not (tmp_path / "cache").exists()


def test_a_training_folder_is_refused_naming_its_checkpoint(tmp_path):
    torch.save({"model": small_model().state_dict(), "config": vars(SMALL)}, tmp_path / "ckpt.pt")
    with pytest.raises(UserError) as error:
        load_model(str(tmp_path), torch.device("cpu"), torch.float32)
    assert str(error.value) == (f"cannot load --ckpt={tmp_path}: a training folder (ckpt.pt, no config.json): "
                                f"pass {tmp_path / 'ckpt.pt'}")


def rewrite_header(path, name, **entry):
    """Change the header entry of tensor `name` in a .safetensors file (None drops a key)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header[name] = {k: v for k, v in {**header[name], **entry}.items() if v is not None}
    head = json.dumps(header).encode()
    path.write_bytes(len(head).to_bytes(8, "little") + head + raw[8 + n:])


def break_folder(folder, damage):
    """A Hugging Face folder of a small model, damaged in one way; returns what the message must say."""
    small_model().save_pretrained(folder)
    weights, config, index = (folder / name for name in ("model.safetensors", "config.json",
                                                         "model.safetensors.index.json"))
    w, c, i = (re.escape(str(path)) for path in (weights, config, index))
    messages = {
        "index without weight_map": rf"{i} has no weight_map",
        "index not JSON": rf"{i} is not JSON",
        "entry without dtype": rf"{w}: the header entry of lm_head.bias has no dtype",
        "shape of other size than the data": rf"{w}: lm_head.bias has shape \[7, 7\] in F32, 196 bytes, but 2048 bytes",
        "tensors of other sizes than config.json":
            r"the tensors do not fit the model their config describes \(size mismatch for embed_tokens.weight",
        "config.json a list": rf"{c} holds a JSON list, not the object of a Hugging Face config",
        "config.json with a string size": rf"{c}: num_hidden_layers is '2', not a positive integer",
        "tied embeddings": rf"{c}: tie_word_embeddings .* is not phi-1's architecture",
        "dtype not a string": rf"{w}: lm_head.bias has dtype \['F32'\], which this reader does not take",
        "integer weights": r"lm_head.bias holds torch.int32 values: phi-1's weights are floating point",
        "heads that do not split the width": rf"{c}: a width of 128 does not split into 3 heads",
        "rotary wider than a head": rf"{c}: rotary on 128 dims of a head of 64"}
    config_changes = {"tensors of other sizes than config.json": {"hidden_size": 256, "intermediate_size": 1024},
                      "config.json with a string size": {"num_hidden_layers": "2"},
                      "tied embeddings": {"tie_word_embeddings": True},
                      "heads that do not split the width": {"num_attention_heads": 3, "num_key_value_heads": 3},
                      "rotary wider than a head": {"partial_rotary_factor": 2.0}}
    if damage.startswith("index"):  # a sharded checkpoint with a damaged index
        tensors = read_safetensors(weights)
        weights.unlink()
        shard(folder, tensors)
        index.write_text('{"metadata": {}}' if damage == "index without weight_map" else "nope")
    elif damage == "entry without dtype":
        rewrite_header(weights, "lm_head.bias", dtype=None)
    elif damage == "dtype not a string":
        rewrite_header(weights, "lm_head.bias", dtype=["F32"])
    elif damage == "integer weights":  # I32: as many bytes as F32
        rewrite_header(weights, "lm_head.bias", dtype="I32")
    elif damage == "shape of other size than the data":
        rewrite_header(weights, "lm_head.bias", shape=[7, 7])
    elif damage == "config.json a list":
        config.write_text("[1, 2]")
    else:
        config.write_text(json.dumps({**json.loads(config.read_text()), **config_changes[damage]}))
    return messages[damage]


DAMAGES = ["index without weight_map", "index not JSON", "entry without dtype", "shape of other size than the data",
           "tensors of other sizes than config.json", "config.json a list", "config.json with a string size",
           "tied embeddings", "dtype not a string", "integer weights", "heads that do not split the width",
           "rotary wider than a head"]


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_hf_folder_is_one_line_naming_the_file_and_what_is_wrong(tmp_path, damage):
    message = break_folder(tmp_path, damage)
    with pytest.raises(ValueError, match=message):
        GPT.from_pretrained(str(tmp_path))
    with pytest.raises(UserError, match=rf"^cannot load --ckpt={re.escape(str(tmp_path))}: {message}"):
        load_model(str(tmp_path), torch.device("cpu"), torch.float32)


def test_a_weights_file_of_a_hf_folder_is_refused_naming_the_folder(tmp_path):
    small_model().save_pretrained(tmp_path)
    for name in ("model.safetensors", "config.json"):
        with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path / name))} is one file of a Hugging Face "
                                             rf"model: pass its folder, {re.escape(str(tmp_path))}$"):
            GPT.from_pretrained(str(tmp_path / name))


def test_a_file_or_folder_that_is_no_model_is_named_as_such(tmp_path):
    """A prepared dataset's meta.json was called one file of a Hugging Face model, and a
    folder without config.json a missing file."""
    (tmp_path / "meta.json").write_text("{}")
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path / 'meta.json'))} is not a model: give a "
                                         r"checkpoint \(\.pt\), or a Hugging Face model's folder"):
        GPT.from_pretrained(str(tmp_path / "meta.json"))
    with pytest.raises(FileNotFoundError, match=rf"^{re.escape(str(tmp_path))} holds no config.json: not a "
                                                r"Hugging Face model's folder"):
        GPT.from_pretrained(str(tmp_path))


def test_a_checkpoint_under_a_tilde_loads_and_one_that_is_no_file_is_named_as_such(tmp_path, monkeypatch):
    """--ckpt=~/x reaches Python unexpanded, and /dev/null was "no such checkpoint"."""
    monkeypatch.setenv("HOME", str(tmp_path))
    torch.save({"model": small_model().state_dict(), "config": vars(SMALL)}, tmp_path / "ckpt.pt")
    assert torch.equal(GPT.from_pretrained("~/ckpt.pt").lm_head.weight, small_model().lm_head.weight)
    with pytest.raises(ValueError, match="^/dev/null is neither a checkpoint file nor a model's folder$"):
        GPT.from_pretrained("/dev/null")


def test_a_checkpoint_trained_with_the_triton_kernel_samples_with_auto(tmp_path):
    """"triton" asks for the kernel where there is none (the CPU): a note on every sample.py run."""
    path = tmp_path / "ckpt.pt"
    torch.save({"model": GPT(PRESETS["nano"]).state_dict(), "config": {**vars(PRESETS["nano"]), "attention": "triton"}},
               path)
    assert load_model(str(path), torch.device("cpu"), torch.float32).config.attention == "auto"


def test_a_model_without_the_tokenizers_ids_is_refused_at_load(tmp_path):
    """sample.py and the others feed load_model's model the tokenizer's 50295 ids: fewer rows
    would fail at the first prompt (a HF folder or a checkpoint of ours alike)."""
    small_model().save_pretrained(tmp_path / "hf")  # a 512-token vocabulary
    torch.save({"model": small_model().state_dict(), "config": vars(SMALL)}, tmp_path / "ckpt.pt")
    for name in (tmp_path / "hf", tmp_path / "ckpt.pt"):
        with pytest.raises(UserError, match=f"^cannot use --ckpt={re.escape(str(name))}: its vocabulary of 512 "
                                            f"ids is smaller than the tokenizer's {tokenizer.VOCAB_SIZE}"):
            load_model(str(name), torch.device("cpu"), torch.float32)
    assert tokenizer.VOCAB_SIZE == 50295


def test_forward_loss_ignores_minus_one_targets():
    model = small_model(seed=6)
    idx = torch.randint(0, SMALL.vocab_size, (2, 16))
    targets = torch.randint(0, SMALL.vocab_size, (2, 16))
    masked = targets.clone()
    masked[:, :8] = -1
    _, loss_all = model(idx, targets)
    logits, loss_half = model(idx, masked)
    expected = torch.nn.functional.cross_entropy(logits[:, 8:].reshape(-1, SMALL.vocab_size),
                                                 targets[:, 8:].reshape(-1))
    torch.testing.assert_close(loss_half, expected)
    assert not torch.isclose(loss_all, loss_half)
    assert model(idx, torch.full_like(targets, -1))[1].item() == 0.0  # nothing to count: 0, not nan


# ---------------------------------------------------------------- edges of generation, interop and loading

def scripted(monkeypatch, rows):
    """Make generate()'s sampler return, at step t, rows[t] (one token per row)."""
    steps = iter(rows)
    monkeypatch.setattr(model_module, "sample", lambda logits, *args: torch.tensor(next(steps)))


def test_padding_rows_of_the_vocabulary_are_never_generated():
    """The embedding is padded to 51200 rows; ids past the tokenizer's cannot be decoded."""
    model = small_model(seed=7, config=ONE_LAYER)
    with torch.no_grad():
        model.lm_head.bias[tokenizer.VOCAB_SIZE:] = 100.0  # an untrained padding row that wins
    for temperature in (0.0, 1.0):
        out = model.generate([[1, 2, 3]], 4, temperature=temperature, seed=0)[0]
        assert len(out) == 4 and all(t < tokenizer.VOCAB_SIZE for t in out)


def test_on_token_sees_exactly_the_tokens_returned(monkeypatch):
    """A server streams what on_token sees: it must match what generate() returns
    (no <|endoftext|>, nothing after a row ended), then None as the row ends."""
    model = small_model(seed=4, config=ONE_LAYER)
    word = tokenizer.encode("def")[0]
    scripted(monkeypatch, [[word, word], [tokenizer.EOT, word], [word, tokenizer.EOT], [word, word]])
    seen = []
    out = model.generate([[1, 2], [3]], max_new_tokens=4, on_token=lambda row, t: seen.append((row, t)))
    assert out == [[word], [word, word]]
    assert seen == [(0, word), (1, word), (0, None), (1, word), (1, None)]


def test_each_row_ends_at_its_own_budget_and_the_batch_with_the_last_row(monkeypatch):
    """A server batches requests of different max_tokens: each row ends at its own,
    reported as it does, and decoding stops once every row has (not at the largest budget)."""
    model = small_model(seed=4, config=ONE_LAYER)
    word = tokenizer.encode("def")[0]
    scripted(monkeypatch, [[word, word, word], [word, word, tokenizer.EOT]])  # a third step would raise
    seen = []
    out = model.generate([[1], [2, 3], [4]], [0, 2, 9], on_token=lambda row, t: seen.append((row, t)))
    assert out == [[], [word, word], [word]]
    assert seen == [(0, None), (1, word), (2, word), (1, word), (1, None), (2, None)]
    with pytest.raises(ValueError, match="a list of one per prompt"):
        model.generate([[1], [2]], [1])


def test_a_row_that_ends_does_not_end_the_others(monkeypatch):
    """Batched prompts finish at different times; the others run on to max_new_tokens."""
    model = small_model(seed=4, config=ONE_LAYER)
    word = tokenizer.encode("def")[0]
    scripted(monkeypatch, [[tokenizer.EOT, word]] + [[word, word]] * 5)
    assert model.generate([[1, 2], [3]], max_new_tokens=6) == [[], [word] * 6]


def test_a_stop_string_spelled_one_byte_per_token_stops(monkeypatch):
    """A 4-byte character can arrive as 4 byte tokens: the stop check must decode
    enough tokens (bytes, not characters) to see it."""
    model = small_model(seed=4, config=ONE_LAYER)
    clef = "\U0001D11E"  # 𝄞, 4 bytes in UTF-8
    byte_id = {tokenizer.decode_bytes([i]): i for i in range(256)}  # GPT-2's 256 one-byte tokens
    byte_tokens = [byte_id[bytes([b])] for b in clef.encode()]
    scripted(monkeypatch, [[t] for t in byte_tokens] * 3)
    out = model.generate([[1]], max_new_tokens=12, stop=[clef])[0]
    assert out == byte_tokens


def test_one_stop_string_may_be_given_as_a_str(monkeypatch):
    r"""stop="\ndef" is one stop string, not the stops "\n", "d", "e", "f"."""
    model = small_model(seed=4, config=ONE_LAYER)
    word, newline = tokenizer.encode("def")[0], tokenizer.encode("\n")[0]
    scripted(monkeypatch, [[word], [newline], [word], [word]])
    assert model.generate([[1]], max_new_tokens=4, stop="\ndef")[0] == [word, newline, word]


def test_an_empty_stop_string_stops_nothing(monkeypatch):
    """An empty --stop is in every text; like cut_at_stop, generate ignores it."""
    model = small_model(seed=4, config=ONE_LAYER)
    assert len(model.generate([[1, 2]], max_new_tokens=5, stop=["", "\x00never"])[0]) == 5


def test_top_p_keeps_the_smallest_set_that_reaches_it_and_maps_back_to_ids():
    """top_p is met by equality (4 equal tokens, top_p 0.5: two of them), and the
    nucleus is drawn in vocabulary ids, not in the sorted order used to find it."""
    def draws(logits, top_p):
        return {int(sample(logits, 1.0, top_p, torch.Generator().manual_seed(i))) for i in range(200)}

    assert len(draws(torch.zeros(1, 4), 0.5)) == 2
    assert draws(torch.tensor([[-5.0, 2.9, -6.0, 3.0]]), 0.9) == {1, 3}


def test_a_bfloat16_model_generates():
    """--dtype bfloat16 without autocast: the cache must hold the model's dtype."""
    model = small_model(seed=3, config=ONE_LAYER).to(torch.bfloat16)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    prompt = [5, 17, 300]
    out = model.generate([prompt, [7]], max_new_tokens=4)
    assert [len(o) for o in out] == [4, 4]
    with torch.no_grad():
        assert out[0][0] == int(model(torch.tensor([prompt]))[0][0, -1, :tokenizer.VOCAB_SIZE].argmax())


def test_logits_that_overflow_float16_are_an_error_naming_the_dtype_not_garbage():
    """Sampling failed in torch's multinomial, and greedy decoding gave token 0 over and over."""
    model = small_model(seed=3).half()
    with torch.no_grad():  # each fits float16, their sum does not
        model.layers[0].attn_out_bias.fill_(60000)
        model.layers[0].mlp_out_bias.fill_(60000)
    for temperature in (0.0, 1.0):
        with pytest.raises(FloatingPointError, match=r"NaN or infinite in float16 .* \(--dtype=float32\)"):
            model.generate([[1, 2], [3]], 4, temperature, seed=0)


def test_greedy_generation_is_the_same_in_training_mode_which_it_gives_back():
    """train.py samples mid-training, and from_hf_state_dict's model is in training mode:
    dropout changed the greedy tokens."""
    model = small_model(seed=3, config=replace(SMALL, dropout=0.5))
    expected = model.generate([[1, 2, 3]], 10)
    model.train()
    assert model.generate([[1, 2, 3]], 10) == expected
    assert model.training and all(m.training for m in model.modules())


def test_a_minimal_hf_config_gets_transformers_defaults():
    """Keys a config.json leaves out mean transformers' PhiConfig defaults
    (partial_rotary_factor 0.5, rope_theta 10000, 2048 positions)."""
    c = config_from_hf({"hidden_size": 2048, "num_attention_heads": 32, "num_hidden_layers": 24,
                        "vocab_size": 51200})
    assert c.rotary_dim == 32
    assert (c.rope_base, c.block_size) == (10000.0, 2048)
    with pytest.raises(ValueError, match="MLP width"):
        config_from_hf({"hidden_size": 64, "num_attention_heads": 1, "num_hidden_layers": 1,
                        "vocab_size": 512, "intermediate_size": 128})


def test_hf_config_values_of_the_wrong_type_are_one_error_and_rotary_widths_read_as_transformers_reads_them():
    base = {"hidden_size": 128, "num_attention_heads": 2, "num_hidden_layers": 1, "vocab_size": 512}
    for key, value in [("partial_rotary_factor", None), ("partial_rotary_factor", "0.5"), ("rope_theta", None),
                       ("layer_norm_eps", True), ("rope_scaling", "linear")]:  # were TypeErrors, or true taken
        with pytest.raises(ValueError, match=f"config.json: {key} is"):
            config_from_hf({**base, key: value})
    # transformers takes int(factor * head_dim) rotary dims: heads of 112 and 44 at factors near 34/112, 30/44
    assert config_from_hf({**base, "hidden_size": 672, "num_attention_heads": 6,
                           "partial_rotary_factor": 34 / 112}).rotary_dim == int(34 / 112 * 112) == 34
    for n_embd, n_head, rotary_dim in [(672, 6, 34), (88, 2, 30), (128, 2, 32)]:  # our exports read back the same
        exported = model_module.hf_config_from(GPTConfig(n_layer=1, n_head=n_head, n_embd=n_embd, block_size=64,
                                                         rotary_dim=rotary_dim))
        assert int(exported["partial_rotary_factor"] * (n_embd // n_head)) == rotary_dim
        assert config_from_hf(exported).rotary_dim == rotary_dim


def test_save_pretrained_keeps_a_non_default_rope_base(tmp_path):
    """A model trained with another rotary base must export it, or transformers
    silently uses 10000 and gives other logits."""
    config = GPTConfig(n_layer=1, n_head=2, n_embd=128, block_size=64, vocab_size=512, rope_base=500.0)
    ours = small_model(seed=1, config=config)
    ours.save_pretrained(tmp_path)
    hf = transformers.PhiForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    idx = torch.randint(0, config.vocab_size, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx)[0], rtol=1e-5, atol=1e-5)


def test_hf_state_dicts_that_do_not_fit_together_are_named():
    state = small_model().to_hf_state_dict()
    with pytest.raises(ValueError, match="no model.layers"):
        GPT.from_hf_state_dict({k: v for k, v in state.items() if not k.startswith("model.layers.")})
    state["model.layers.1.self_attn.k_proj.weight"] = state["model.layers.1.self_attn.k_proj.weight"][:, :-1]
    with pytest.raises(ValueError, match=r"the tensors of model.layers.1 do not fit together \(Sizes of tensors"):
        GPT.from_hf_state_dict(state)


def test_hf_state_dicts_load_without_a_config_and_with_common_extras():
    """Without a config, heads are phi-1's 64 wide; older transformers saved
    rotary_emb.inv_freq buffers and DDP prefixes names with "module.": both load."""
    ours = small_model(seed=8)
    state = {"module." + k: v for k, v in ours.to_hf_state_dict().items()}
    state["module.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(16)
    loaded = GPT.from_hf_state_dict(state)
    assert loaded.config.n_head == SMALL.n_head
    idx = torch.randint(0, SMALL.vocab_size, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx)[0], ours(idx)[0], rtol=1e-5, atol=1e-5)


def test_safetensors_lfs_pointer_says_how_to_fix_and_data_is_aligned(tmp_path):
    """A git-lfs pointer gets the fix (git lfs pull); written data starts 8-byte aligned,
    as the format asks, for readers that map tensors in place; a file cut short is named."""
    pointer = tmp_path / "model.safetensors"
    pointer.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 9\n")
    with pytest.raises(ValueError, match="git lfs pull"):
        read_safetensors(pointer)
    write_safetensors(tmp_path / "w.safetensors", {"odd_name": torch.ones(3), "x": torch.arange(2)})
    raw = (tmp_path / "w.safetensors").read_bytes()
    assert int.from_bytes(raw[:8], "little") % 8 == 0
    (tmp_path / "cut.safetensors").write_bytes(raw[:-4])  # cut inside the last tensor: not zero-filled
    with pytest.raises(ValueError, match="cut.safetensors is truncated: x ends past"):
        read_safetensors(tmp_path / "cut.safetensors")


def test_checkpoints_without_config_or_with_foreign_objects_are_refused(tmp_path):
    """A checkpoint is read as tensors only (an arbitrary pickle could run code),
    and needs both model and config."""
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {}}, path)
    with pytest.raises(ValueError, match="not a phi1 checkpoint"):
        load_checkpoint(path)
    torch.save({"model": {}, "config": {}, "saved": datetime.date(2020, 1, 1)}, path)
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(path)
    for config, message in (([1, 2], "its config is a list, not a dict"),
                            (dict(n_layer="1"), "n_layer is '1', not a positive integer"),
                            (dict(n_head=3), "a width of 2048 does not split into 3 heads")):
        torch.save({"model": {}, "config": config}, path)
        with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: {message}"):
            load_checkpoint(path)
        with pytest.raises(UserError, match=f"cannot load --ckpt={re.escape(str(path))}: .*{message}"):
            load_model(str(path), torch.device("cpu"), torch.float32)


def test_pick_dtype_and_pick_device(monkeypatch):
    """--dtype auto is float32 on the CPU; bad names and absent GPUs are one-line errors."""
    cpu = torch.device("cpu")
    assert pick_dtype("auto", cpu) == torch.float32 and pick_dtype("bfloat16", cpu) == torch.bfloat16
    with pytest.raises(UserError, match="--dtype"):
        pick_dtype("fp16", cpu)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with one GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert pick_device("auto") == torch.device("cuda") and pick_device("cuda:0") == torch.device("cuda:0")
    for name in ("cuda:1", "meta", "nonsense"):
        with pytest.raises(UserError, match="--device"):
            pick_device(name)
    # auto on a GPU: bfloat16 where the GPU computes in it (Ampere on), else float16 (with a
    # loss scale): a V100 or T4 got bfloat16, which torch emulates there, slowly
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True, raising=False)
    for major, dtype in ((7, torch.float16), (8, torch.bfloat16), (9, torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(major=major))
        assert pick_dtype("auto", torch.device("cuda")) == dtype, major


class HubResponse:
    """The hub's answer for one file of folder: 404 if it has none, else its bytes and
    their Content-Length (unless not sized: sent chunked), or `chunks` in their place (a
    download cut short)."""

    def __init__(self, folder, name, chunks=None, sized=True):
        file = folder / name
        self.status_code = 200 if file.exists() else 404
        self.headers = {"content-length": str(file.stat().st_size)} if file.exists() and sized else {}
        self.chunks = [file.read_bytes()] if chunks is None and file.exists() else chunks

    def iter_content(self, size):
        yield from self.chunks

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_a_single_file_hub_repo_downloads_once(tmp_path, monkeypatch):
    """Most hub repos have one model.safetensors and no index: the index's 404 is
    not an error, and a second load asks the hub nothing."""
    monkeypatch.setenv("PHI1_CACHE", str(tmp_path / "cache"))
    ours = small_model(seed=2)
    ours.save_pretrained(tmp_path / "hub")
    asked = []

    def get(url, **kwargs):
        asked.append(url.rsplit("/", 1)[-1])
        return HubResponse(tmp_path / "hub", asked[-1])
    monkeypatch.setattr(requests, "get", get)
    loaded = GPT.from_pretrained("someone/phi-tiny")
    assert torch.equal(loaded.lm_head.weight, ours.lm_head.weight)
    assert sorted(asked) == ["config.json", "model.safetensors", "model.safetensors.index.json"]
    GPT.from_pretrained("someone/phi-tiny")
    assert len(asked) == 3


def test_a_download_cut_short_or_interrupted_leaves_nothing_in_the_cache(tmp_path, monkeypatch):
    """A response short of its Content-Length was cached (then "truncated" for ever), and
    Ctrl-C left its .part file (gigabytes for phi-1)."""
    monkeypatch.setenv("PHI1_CACHE", str(tmp_path / "cache"))
    small_model(seed=2).save_pretrained(tmp_path / "hub")
    weights = (tmp_path / "hub" / "model.safetensors").read_bytes()
    cache = tmp_path / "cache" / "hub" / "someone" / "phi-tiny"

    def interrupted():
        yield weights[:100]
        raise KeyboardInterrupt

    cases = [([weights[:100]], True, ConnectionError, f"ended after 100 of its {len(weights)} bytes; try again"),
             ([weights[:-4]], False, ConnectionError, "is not a whole safetensors file .*; try again"),  # no size sent
             ([b"<html>a proxy's page</html>"], False, ConnectionError, "is not a whole safetensors file"),
             (interrupted(), True, KeyboardInterrupt, None)]
    for chunks, sized, error, message in cases:
        monkeypatch.setattr(requests, "get", lambda url, **kwargs: HubResponse(
            tmp_path / "hub", url.rsplit("/", 1)[-1], chunks if url.endswith("/model.safetensors") else None, sized))
        with pytest.raises(error, match=message):
            GPT.from_pretrained("someone/phi-tiny")
        assert [f.name for f in cache.iterdir()] == ["config.json"]
    monkeypatch.setattr(requests, "get", lambda url, **kwargs: HubResponse(tmp_path / "hub", url.rsplit("/", 1)[-1]))
    assert torch.equal(GPT.from_pretrained("someone/phi-tiny").lm_head.weight, small_model(seed=2).lm_head.weight)


def test_an_uncached_hub_id_offline_is_one_line_with_the_reason_and_the_advice(tmp_path, monkeypatch):
    """urllib3's wrappings of the reason took the 300 characters, cutting both it and the advice."""
    monkeypatch.setenv("PHI1_CACHE", str(tmp_path))
    real_get = requests.get
    with socket.socket() as closed:  # bound, not listening: a connection to it is refused at once
        closed.bind(("127.0.0.1", 0))
        hub = f"http://127.0.0.1:{closed.getsockname()[1]}"
        monkeypatch.setattr(requests, "get", lambda url, **kwargs: real_get(
            url.replace("https://huggingface.co", hub), **kwargs))
        with pytest.raises(UserError) as error:
            load_for_tokens("someone/uncached")
    assert str(error.value) == ("cannot load someone/uncached: cannot download someone/uncached from the Hugging "
                                "Face hub ([Errno 111] Connection refused); pass a local folder with config.json and "
                                "*.safetensors instead")


def test_an_empty_phi1_cache_means_the_default_cache_not_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("PHI1_CACHE", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    small_model(seed=2).save_pretrained(tmp_path / "home" / ".cache" / "phi1" / "hub" / "someone" / "phi-tiny")

    def offline(*args, **kwargs):
        raise requests.ConnectionError("no network")
    monkeypatch.setattr(requests, "get", offline)
    assert torch.equal(GPT.from_pretrained("someone/phi-tiny").lm_head.weight, small_model(seed=2).lm_head.weight)


def test_flops_per_token_of_phi_1():
    """6 per non-embedding weight plus 12 * layers * width * context (MFU in train.py)."""
    with torch.device("meta"):
        model = GPT(PRESETS["phi-1"])
    non_embedding = 1_418_270_720 - 51200 * 2048
    assert model.num_params(embedding=False) == non_embedding
    assert model.flops_per_token() == 6 * non_embedding + 12 * 24 * 2048 * 2048


def test_set_context_extends_positions_and_full_context_is_accepted():
    """Training at a longer context after set_context; positions already seen keep their logits."""
    model = small_model(seed=9)
    idx = torch.randint(0, SMALL.vocab_size, (1, 100))
    with torch.no_grad():
        before = model(idx[:, :64])[0]  # exactly the context: accepted
        model.set_context(128)
        after = model(idx)[0]
    torch.testing.assert_close(after[:, :64], before, rtol=1e-5, atol=1e-5)


def test_every_query_of_a_padded_batch_sees_some_key(monkeypatch):
    """A query with no allowed key is NaN in some SDPA backends (0 in others): a pad
    position's NaN would reach real rows through 0 * NaN in the next layer's V."""
    model = small_model(seed=5, config=ONE_LAYER)
    masks, attend = [], model_module.attend
    monkeypatch.setattr(model_module, "attend", lambda q, k, v, *a, mask=None, **kw: masks.append(mask)
                        or attend(q, k, v, *a, mask=mask, **kw))
    model.generate([[1, 2, 3, 4], [5]], max_new_tokens=3)
    assert len(masks) == 3 and all(m is not None and m.any(-1).all() for m in masks)


def test_every_generation_step_has_the_logits_of_a_full_forward(monkeypatch):
    """Greedy tokens hide small errors (a position off by one, a pad key attended):
    each step's logits, for every row of a left-padded batch, must be those of a
    plain forward of that row's prompt and tokens so far."""
    model = small_model(seed=3)  # vocabulary 512: no <|endoftext|> to end a row early
    seen, sample_ = [], model_module.sample
    monkeypatch.setattr(model_module, "sample", lambda logits, *a: seen.append(logits.clone()) or sample_(logits, *a))
    prompts = [[5, 17, 300, 42, 9], [7], [100, 200, 300]]
    out = model.generate(prompts, max_new_tokens=5)
    assert len(seen) == 5 and all(len(o) == 5 for o in out)
    with torch.no_grad():
        for row, prompt in enumerate(prompts):  # one forward gives every step's logits
            full = model(torch.tensor([prompt + out[row][:-1]]))[0][0, len(prompt) - 1:]
            torch.testing.assert_close(torch.stack([logits[row] for logits in seen]), full, rtol=1e-4, atol=1e-4)


def test_under_triton_interpret_cuda_tensors_are_left_to_sdpa(caplog, monkeypatch):
    """TRITON_INTERPRET set (for the kernel's tests) on a GPU machine ran every attention of
    the model in the interpreter, copying each call to the host, without a word."""
    class OnCuda(torch.Tensor):  # a CPU tensor that says it is on CUDA: the path attend takes there
        is_cuda = property(lambda self: True)

    def launch(*args, **kwargs):
        raise AssertionError("the interpreter was launched")
    interpreted = SimpleNamespace(INTERPRET=True, unsupported_reason=lambda *args: None, flash_attn_func=launch)
    monkeypatch.setattr(model_module, "_flash_kernel", lambda: interpreted)
    monkeypatch.setattr(model_module, "_warned", set())
    q, k, v = (torch.randn(1, 2, 5, 32) for _ in range(3))
    with caplog.at_level(logging.WARNING):
        out = model_module.attend(*(t.as_subclass(OnCuda) for t in (q, k, v)), causal=True)
    torch.testing.assert_close(out.as_subclass(torch.Tensor),
                               torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert [r.getMessage() for r in caplog.records] == [
        "FlashAttention kernel rejected this call (TRITON_INTERPRET is set: the interpreter, for the kernel's "
        "tests, would copy every call to the host); using PyTorch SDPA"]


def test_an_unknown_attention_is_refused_not_taken_for_sdpa():
    for build in (lambda: GPT(replace(SMALL, attention="Triton")),
                  lambda: config_from_dict({**vars(SMALL), "attention": "flash"}, "ckpt.pt")):
        with pytest.raises(ValueError, match="attention '(Triton|flash)' is not auto, sdpa or triton"):
            build()


def test_asked_for_the_triton_kernel_on_the_cpu_it_falls_back_once_and_says_why(caplog, monkeypatch):
    """The interpreter runs the kernel for its own tests only: the model says so, once."""
    monkeypatch.setattr(model_module, "_warned", set())
    q, k, v = (torch.randn(1, 2, 5, 32) for _ in range(3))
    with caplog.at_level(logging.WARNING):
        out = [model_module.attend(q, k, v, causal=True, impl="triton") for _ in range(2)]
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert all(torch.allclose(o, expected) for o in out)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["the model runs the Triton FlashAttention kernel on CUDA only (not under "
                        "TRITON_INTERPRET); using PyTorch SDPA"]
