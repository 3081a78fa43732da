"""The reference decoder against exllamav2's own logits (fixtures) and against transformers' models."""
from __future__ import annotations

import json
import math

import pytest
import torch
from fixture_dirs import EXL2
from safetensors.torch import load_file

from helpers.core.errors import CourseError, CourseWarning
from helpers.engines.reference import (
    DecoderConfig,
    KVCache,
    ReferenceModel,
    TextStream,
    Tokenizer,
    rope_inv_freq,
    sample_next,
)

NAMES = ["tiny_llama_b3.0", "tiny_llama_b4.5", "tiny_qwen2_b6.5"]

torch.set_num_threads(2)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def truth(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(EXL2[name] / "exllamav2_truth.safetensors"))


def model_from_truth_weights(name: str, **kw) -> ReferenceModel:
    """The decoder on exllamav2's own dequantized weights (no EXL2 reader involved).

    weight_dq_t is (in, out); the MLP is in exllamav2's runtime order (intermediate dimension permuted), which
    is the same function as the file's order because gate/up columns and down rows are permuted together."""
    t, o = truth(name), load_file(str(EXL2[name] / "output.safetensors"))
    state = {k.replace(".weight_dq_t", ".weight"): v.float().T.contiguous()
             for k, v in t.items() if k.endswith(".weight_dq_t")}
    state.update({k: v.float() for k, v in o.items()
                  if k.endswith(("norm.weight", ".bias")) or k == "model.embed_tokens.weight"})
    cfg = json.loads((EXL2[name] / "config.json").read_text())
    return ReferenceModel.from_state_dict(cfg, state, max_seq_len=kw.pop("max_seq_len", 64), **kw)


# --- exllamav2's fixtures ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_causal_logits_match_exllamav2_through_the_exl2_reader(name):
    t = truth(name)
    model = ReferenceModel.from_dir(EXL2[name], max_seq_len=64)
    prefill = model.forward(t["input_ids"])
    step = model.forward(t["next_id"], reset=False)
    assert prefill.shape == t["logits_prefill"].shape and step.shape == t["logits_step"].shape
    assert rel_l2(prefill, t["logits_prefill"]) < 0.01
    assert rel_l2(step, t["logits_step"]) < 0.01
    assert model.depth == 33


@pytest.mark.parametrize("name", NAMES)
def test_causal_logits_match_exllamav2_on_its_own_dequantized_weights(name):
    t = truth(name)
    model = model_from_truth_weights(name)
    assert rel_l2(model.forward(t["input_ids"]), t["logits_prefill"]) < 0.01
    assert rel_l2(model.decode_step(int(t["next_id"])), t["logits_step"][0, 0]) < 0.01


@pytest.mark.parametrize("name", NAMES)
def test_exllamav2_sdpa_path_is_the_non_causal_prefill(name):
    """docs/FACTS.md §3: exllamav2 0.3.2's SDPA path without flash-attn drops the causal mask."""
    t = truth(name)
    model = model_from_truth_weights(name)
    causal = model.forward(t["input_ids"])
    non_causal = model.forward(t["input_ids"], causal=False)
    step_after = model.forward(t["next_id"], reset=False)        # a causal step over the non-causal cache
    assert rel_l2(non_causal, t["logits_prefill_sdpa"]) < 0.01
    assert rel_l2(step_after, t["logits_step_sdpa"]) < 0.01
    assert rel_l2(causal, t["logits_prefill_sdpa"]) > 0.5        # the SDPA path is far from the causal answer
    assert rel_l2(t["logits_step"], t["logits_step_sdpa"]) > 0.3  # and its wrong cache spoils later steps too


# --- agreement with transformers ----------------------------------------------------------------------------------

def _tiny_hf(kind: str):
    import transformers as tf

    common = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
    if kind == "llama_tied":
        cfg = tf.LlamaConfig(**common, tie_word_embeddings=True, rope_theta=100000.0)
        cls = tf.LlamaForCausalLM
    elif kind == "llama3_rope":
        cfg = tf.LlamaConfig(**common, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32})
        cls = tf.LlamaForCausalLM
    elif kind == "qwen2_bias":
        cfg = tf.Qwen2Config(**common, tie_word_embeddings=False)
        cls = tf.Qwen2ForCausalLM
    elif kind == "mistral_window":
        cfg = tf.MistralConfig(**common, sliding_window=8)
        cls = tf.MistralForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():  # random init leaves norms at 1 and biases at 0: make them matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.3)
    hf_cfg = cfg.to_dict()
    hf_cfg["architectures"] = [cls.__name__]
    hf_cfg.setdefault("rope_theta", (hf_cfg.get("rope_parameters") or {}).get("rope_theta"))
    return model, hf_cfg


@pytest.mark.parametrize("kind", ["llama_tied", "llama3_rope", "qwen2_bias", "mistral_window"])
def test_agrees_with_transformers_prefill_and_decode(kind):
    hf, cfg = _tiny_hf(kind)
    state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    if kind == "qwen2_bias":
        assert "model.layers.0.self_attn.q_proj.bias" in state
    ref = ReferenceModel.from_state_dict(cfg, state, max_seq_len=64)
    ids = torch.randint(0, 320, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
    assert rel_l2(ref.forward(ids), expected) < 1e-4
    # the same logits token by token through the cache: a prefill of 12, a chunk of 3 appended, then single steps
    got = [ref.forward(ids[:, :12]), ref.forward(ids[:, 12:15], reset=False)]
    got += [ref.decode_step(int(t))[None, None] for t in ids[0, 15:]]
    assert rel_l2(torch.cat(got, dim=1), expected) < 1e-4


def test_llama3_rope_keeps_short_wavelengths_and_slows_long_ones():
    cfg = DecoderConfig.from_hf(dict(architectures=["LlamaForCausalLM"], vocab_size=8, hidden_size=512,
                                     intermediate_size=8, num_hidden_layers=1, num_attention_heads=4,
                                     rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 8192}))
    plain = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128))
    scaled = rope_inv_freq(cfg)
    assert scaled[0] == plain[0]                                  # wavelength 2*pi: untouched
    assert math.isclose(float(scaled[-1]), float(plain[-1]) / 8)  # longest wavelength: slowed by the factor


def test_agrees_with_transformers_on_the_embedded_models_float_source():
    from transformers import AutoModelForCausalLM

    from helpers.models.embedded import float_model_dir

    folder = float_model_dir()
    ref = ReferenceModel.from_dir(folder, max_seq_len=128)
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids = ref.tokenizer.encode("What is the capital of France?", chat=True)
    with torch.no_grad():
        expected = hf(ids).logits
    got = ref.forward(ids)
    assert rel_l2(got, expected) < 1e-4
    assert int(got[0, -1].argmax()) == int(expected[0, -1].argmax())


# --- the cache ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny_llama_b3.0", "tiny_qwen2_b6.5"])
def test_cache_is_preallocated_in_exllamav2s_layout(name):
    model = ReferenceModel.from_dir(EXL2[name], max_seq_len=100)
    cfg = model.config.shape
    assert len(model.cache.key_states) == len(model.cache.value_states) == cfg.n_layers == 2
    for t in model.cache.all_tensors():
        assert tuple(t.shape) == (1, 100, cfg.n_kv_heads, cfg.head_dim) == (1, 100, 2, 64)
        assert t.dtype == torch.float32
    # 2 (K, V) x 2 layers x 100 positions x 2 KV heads x 64 x 4 bytes
    assert model.cache.nbytes() == 2 * 2 * 100 * 2 * 64 * 4 == 204_800
    assert model.cache.bytes_per_token() == 2048
    ptrs = [t.data_ptr() for t in model.cache.all_tensors()]
    model.forward(torch.arange(10)[None])
    for i in range(5):
        model.decode_step(i)
    assert [t.data_ptr() for t in model.cache.all_tensors()] == ptrs   # written in place, never reallocated
    assert model.depth == 15
    assert model.cache.key_states[0][0, :15].abs().sum() > 0 and model.cache.key_states[0][0, 15:].abs().sum() == 0


def test_kv_cache_fp16_is_half_the_bytes():
    assert KVCache(3, 10, 2, 8, dtype=torch.float16).nbytes() * 2 == KVCache(3, 10, 2, 8).nbytes() == 3840


def test_fill_cache_then_decode():
    model = ReferenceModel.from_dir(EXL2["tiny_llama_b4.5"], max_seq_len=512)
    model.fill_cache(400, seed=3)
    assert model.depth == 400
    k0 = model.cache.key_states[1][0, :400].clone()
    assert 0.9 < float(k0.std()) < 1.1 and model.cache.key_states[1][0, 400:].abs().sum() == 0
    a = model.decode_step(5)
    assert model.depth == 401 and a.shape == (1024,) and torch.isfinite(a).all()
    model.fill_cache(400, seed=3)
    assert torch.equal(model.cache.key_states[1][0, :400], k0)           # same seed, same values
    assert torch.equal(model.decode_step(5), a)
    model.fill_cache(400, seed=4)
    assert not torch.allclose(model.decode_step(5), a)                   # the step reads the filled positions


# --- bad input --------------------------------------------------------------------------------------------------

def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    cfg = json.loads((EXL2["tiny_llama_b3.0"] / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CourseError, match="GPT2LMHeadModel is not supported.*LlamaForCausalLM, MistralForCausalLM, "
                                          "Qwen2ForCausalLM"):
        ReferenceModel.from_dir(tmp_path)


def test_unsupported_rope_scaling_is_one_clear_line():
    cfg = json.loads((EXL2["tiny_qwen2_b6.5"] / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}
    with pytest.raises(CourseError, match="RoPE scaling 'yarn' is not implemented.*exllamav2"):
        DecoderConfig.from_hf(cfg)


def test_missing_top_level_rope_theta_warns_about_exllamav2():
    cfg = json.loads((EXL2["tiny_qwen2_b6.5"] / "config.json").read_text())
    cfg["rope_parameters"]["rope_theta"] = 100000.0
    del cfg["rope_theta"]
    with pytest.warns(CourseWarning, match="fall back to 10000"):
        assert DecoderConfig.from_hf(cfg).shape.rope_theta == 100000.0


def test_context_beyond_the_cache_says_to_raise_max_seq_len():
    model = ReferenceModel.from_dir(EXL2["tiny_llama_b3.0"], max_seq_len=16)
    with pytest.raises(CourseError, match="max_seq_len=16: load the model with a larger max_seq_len"):
        model.forward(torch.zeros(1, 17, dtype=torch.long))
    model.forward(torch.zeros(1, 16, dtype=torch.long))
    with pytest.raises(CourseError, match="larger max_seq_len"):
        model.decode_step(0)
    n = model.tokenizer.encode("hello world").shape[1]
    expected = f"prompt \\({n} tokens\\) plus max_new_tokens \\(15\\).*max_seq_len >= {n + 15}"
    with pytest.raises(CourseError, match=expected):
        model.generate("hello world", max_new_tokens=15, chat=False)


def test_cuda_asked_for_where_there_is_none(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(CourseError, match="no CUDA GPU here: use device='cpu'"):
        ReferenceModel.from_dir(EXL2["tiny_llama_b3.0"], device="cuda")


def test_max_seq_len_beyond_training_is_a_warning_not_an_error():
    with pytest.warns(CourseWarning, match="beyond the 2048 positions"):
        ReferenceModel.from_dir(EXL2["tiny_llama_b3.0"], max_seq_len=4096)


# --- sampling, tokenizer, streaming ---------------------------------------------------------------------------------

def test_sampling_rules():
    logits = torch.tensor([1.0, 3.0, 2.9, -1.0, 0.0])
    assert sample_next(logits) == 1
    assert sample_next(logits, temperature=1.0, top_k=1) == 1
    assert sample_next(logits, temperature=1.0, top_p=0.01) == 1
    gen = torch.Generator().manual_seed(0)
    picks = {sample_next(logits, temperature=1.0, top_k=2, generator=gen) for _ in range(200)}
    assert picks == {1, 2}
    gen = torch.Generator().manual_seed(0)
    picks = [sample_next(logits, temperature=5.0, generator=gen) for _ in range(300)]
    assert set(picks) == {0, 1, 2, 3, 4}
    # top_p keeps the smallest set whose probability reaches p: here the top two (0.51 + 0.46 > 0.9)
    gen = torch.Generator().manual_seed(0)
    assert {sample_next(logits, temperature=1.0, top_p=0.9, generator=gen) for _ in range(200)} == {1, 2}
    a = [sample_next(logits, temperature=1.0, generator=torch.Generator().manual_seed(7)) for _ in range(3)]
    assert len(set(a)) == 1                                           # seeded: reproducible


def test_stream_never_splits_a_character():
    tok = Tokenizer(EXL2["tiny_llama_b3.0"])
    text = "Grüße aus Köln: 20 € — ok ✓"
    ids = tok.encode(text)[0].tolist()
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids) == text
    assert sum(1 for p in pieces if p) > 5                            # it really streams


def test_greedy_generation_is_deterministic_and_streams():
    model = ReferenceModel.from_dir(EXL2["tiny_qwen2_b6.5"], max_seq_len=64)
    pieces = []
    text = model.generate("hello", max_new_tokens=12, chat=False, stream=pieces.append)
    assert text and "".join(pieces) == text
    assert model.generate("hello", max_new_tokens=12, chat=False) == text
    s1 = model.generate("hello", max_new_tokens=12, chat=False, temperature=1.0, seed=1)
    assert s1 == model.generate("hello", max_new_tokens=12, chat=False, temperature=1.0, seed=1)
    assert s1 != model.generate("hello", max_new_tokens=12, chat=False, temperature=1.0, seed=2)


def test_embedded_model_answers_paris():
    from helpers.models.embedded import embedded_model_dir

    model = ReferenceModel.from_dir(embedded_model_dir(), max_seq_len=256)
    assert model.tokenizer.has_chat_template
    answer = model.generate("What is the capital of France?", max_new_tokens=12)
    assert "Paris" in answer


def test_decode_attention_by_hand_is_what_the_fused_kernel_computes():
    from helpers.engines.reference import attention, attention_by_hand

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 9, 64, generator=gen), torch.randn(1, 40, 3, 64, generator=gen),
               torch.randn(1, 40, 3, 64, generator=gen))
    assert torch.allclose(attention(q, k, v, start=39), attention_by_hand(q, k, v), atol=1e-5)
    # a sliding window of 8 reads only the last 8 positions
    assert torch.allclose(attention(q, k, v, start=39, window=8), attention_by_hand(q, k[:, -8:], v[:, -8:]),
                          atol=1e-5)
