"""helpers.memory and helpers.specs: exllamav2's memory accounting, bundled configs and the planner.

Expected values are exact byte counts worked out by hand for known configs, values of checkpoints made by
exllamav2's own converter (tests/fixtures/exl2), or cross-checks between two independent routes."""
import json
import warnings
from pathlib import Path

import pytest
from fixture_dirs import EXL2

from helpers.core.errors import CourseError, CourseWarning
from helpers.core.paths import CONFIGS_DIR
from helpers.core.units import GIB, MIB
from helpers.format.header import exl2_tensors, read_i16
from helpers.format.reader import open_exl2
from helpers.memory.allocation import alloc_bytes
from helpers.memory.breakdown import DEFAULT_CUDA_CONTEXT_BYTES, breakdown, cuda_context_default
from helpers.memory.cache_modes import CACHE_CLASSES, CACHE_MODES, LOAD_AUTOSPLIT_RESERVE_BYTES, check_cache_mode
from helpers.memory.kv_cache import kv_bytes_per_token, kv_cache_bytes, kv_cache_layout, kv_layer_bytes_per_token
from helpers.memory.load_order import load_order
from helpers.memory.scratch import scratch_bytes, scratch_detail
from helpers.memory.setup import LoadSetup
from helpers.memory.simple_calculator import calculator_rows, simple_calculator_bytes
from helpers.memory.weights import _group_map_rows, _linear_from_file, exl2_head_bytes, weight_bytes
from helpers.planning.planner import plan
from helpers.recordings.memory import GPU_RECORDINGS
from helpers.specs.gpus import gpu_spec
from helpers.specs.shapes import ModelShape, bundled_models, model_shape


def small(**kw):
    """4 layers, 2 KV heads of 64: the shape of an external H100 measurement of the cache."""
    base = dict(name="small", architecture="LlamaForCausalLM", n_layers=4, hidden=256, n_heads=4, n_kv_heads=2,
                head_dim=64, intermediate=768, vocab=1024, tied_embeddings=False, max_position_embeddings=4096,
                rotary_dim=64)
    base.update(kw)
    return ModelShape(**base)


# --- the KV cache ------------------------------------------------------------------------------------------------

def test_qwen14b_fp16_cache_exact():
    s = model_shape("qwen2.5-14b")
    assert kv_bytes_per_token(s, "fp16") == 196_608 == 48 * 2 * 8 * 128 * 2
    assert kv_cache_bytes(s, 32768, "fp16") == 6 * GIB
    assert kv_cache_bytes(s, 4096, "fp16") == 0.75 * GIB


def test_every_mode_by_hand_small_shape():
    """4 layers x 32768 tokens x 2 KV heads x 64: one K (or V) of a layer is 4 Mi values. Worked out by hand:
    fp16 4 x 2 x 8 MiB = 64 MiB; fp8 4 x 2 x 4 MiB + 16 MiB FP16 temp K/V = 48 MiB; q8 adds 0.5 MiB of fp16 scales
    per layer (K and V, 32768 tokens x 2 heads x 2 scales x 2 B) -> 4 x 8.5 + 16 = 50 MiB; q6 (K 8 bits, V 4 bits)
    4 x (4 + 2 + 0.5) + 16 = 42 MiB; q4 4 x (2 + 2 + 0.5) + 16 = 34 MiB."""
    s, L = small(), 32768
    expect_mib = {"fp16": 64, "fp8": 48, "q8": 50, "q6": 42, "q4": 34}
    for mode, mib in expect_mib.items():
        assert kv_cache_bytes(s, L, mode) == mib * MIB, mode
        assert kv_bytes_per_token(s, mode) * L == mib * MIB, mode
        # a second route: the tensors exllamav2 would allocate, one by one
        assert sum(r["bytes"] for r in kv_cache_layout(LoadSetup(s, max_seq_len=L, cache_mode=mode))) == mib * MIB, mode
    # measured externally on an H100 (torch allocated) for this shape: FP16 / Q8 / Q4 = 64.0 / 50.0 / 34.x MiB


def test_scales_floor_for_odd_head_dim_and_batch_multiplies():
    s = small(head_dim=80)
    # q4, per token and layer: K and V 2 heads x 40 B = 160 B; scales floor(80/32) = 2 per head, K and V, fp16 = 16 B
    assert kv_layer_bytes_per_token(s, "q4") == 176
    # 3 x 1000 tokens x (4 layers x 176 B + FP16 temp K/V 2 x 2 heads x 80 x 2 B = 640 B)
    assert kv_cache_bytes(s, 1000, "q4", batch=3) == 4_032_000


def test_gqa_and_mqa_cut_the_cache():
    mha, gqa, mqa = small(n_kv_heads=4), small(n_kv_heads=2), small(n_kv_heads=1)
    assert [x.attention_kind for x in (mha, gqa, mqa)] == ["MHA", "GQA", "MQA"]
    assert kv_bytes_per_token(mha) == 2 * kv_bytes_per_token(gqa) == 4 * kv_bytes_per_token(mqa)


def test_sliding_window_layers_are_allocated_at_full_length():
    g = model_shape("gemma-2-9b")
    assert g.sliding_window == 4096 and g.sliding_layers == tuple(range(0, 42, 2))
    full = dataclass_replace(g, sliding_layers=(), sliding_window=0)
    assert kv_cache_bytes(g, 8192) == kv_cache_bytes(full, 8192) == 42 * 2 * 8 * 256 * 2 * 8192
    q = model_shape("qwen2.5-14b")
    assert q.sliding_layers == () and q.config_sliding_layers == ()  # use_sliding_window is false


def dataclass_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


def test_unknown_cache_mode_lists_the_valid_ones():
    with pytest.raises(CourseError, match="fp16, fp8, q8, q6, q4"):
        kv_cache_bytes(small(), 1024, "q3")
    assert check_cache_mode("ExLlamaV2Cache_Q4") == "q4" and check_cache_mode("FP16") == "fp16"
    # every mode names its exllamav2 class, and the class name is accepted back as the mode
    assert list(CACHE_CLASSES) == list(CACHE_MODES)
    assert all(check_cache_mode(cls) == mode for mode, cls in CACHE_CLASSES.items())


# --- bundled configs ---------------------------------------------------------------------------------------------

def test_bundled_configs_carry_their_facts():
    names = bundled_models()
    assert names == sorted(["qwen2.5-7b", "qwen2.5-14b", "qwen2.5-32b", "llama-3.1-8b", "llama-3.3-70b",
                            "mistral-nemo-12b", "gemma-2-9b", "smollm2-135m"])
    for n in names:
        s = model_shape(n)
        assert "huggingface.co/" in s.source, n
    q = model_shape("qwen2.5-14b")
    assert (q.n_layers, q.hidden, q.n_heads, q.n_kv_heads, q.head_dim, q.intermediate, q.vocab) == \
        (48, 5120, 40, 8, 128, 13824, 152064)
    assert not q.tied_embeddings and q.qkv_bias and q.max_position_embeddings == 32768
    # Hugging Face's model.safetensors.index.json for Qwen2.5-14B: total_size 29,540,067,328 bytes of bf16
    assert q.n_params * 2 == 29_540_067_328
    nemo = model_shape("mistral-nemo-12b")
    assert nemo.head_dim == 128 != nemo.hidden // nemo.n_heads  # head_dim given explicitly
    sm = model_shape("smollm2-135m")
    assert (sm.n_layers, sm.hidden, sm.n_heads, sm.n_kv_heads, sm.vocab, sm.tied_embeddings,
            sm.max_position_embeddings) == (30, 576, 9, 3, 49152, True, 8192)
    assert model_shape("llama-3.1-8b").rope_scaling == "llama3"


def test_model_names_normalise_and_suggest():
    assert model_shape("Qwen/Qwen2.5-14B-Instruct").name == "qwen2.5-14b"
    assert model_shape("gemma-2-9b-it").name == "gemma-2-9b"
    with pytest.raises(CourseError, match="Did you mean 'qwen2.5-14b'"):
        model_shape("qwen2.5-15b")
    with pytest.raises(CourseError, match="llama-3.1-8b"):
        model_shape("lama-3.1-8")
    with pytest.raises(CourseError, match="does not exist"):
        model_shape("/no/such/config.json")


def test_config_missing_fields_and_mla_are_clear(tmp_path):
    cfg = json.loads((CONFIGS_DIR / "qwen2.5-7b.json").read_text())
    del cfg["hidden_size"], cfg["vocab_size"]
    p = tmp_path / "config.json"
    p.write_text(json.dumps(cfg))
    with pytest.raises(CourseError, match="missing required field.*hidden_size, vocab_size"):
        model_shape(str(p))
    p.write_text(json.dumps({"architectures": ["DeepseekV3ForCausalLM"], "kv_lora_rank": 512}))
    with pytest.raises(CourseError, match="Multi-head Latent Attention"):
        model_shape(str(p))
    p.write_text(json.dumps({**cfg, "hidden_size": 1024, "vocab_size": 100, "num_hidden_layers": -3}))
    with pytest.raises(CourseError, match="num_hidden_layers"):
        model_shape(str(p))
    p.write_text("{not json")
    with pytest.raises(CourseError, match="not valid JSON"):
        model_shape(str(p))


# --- weights -----------------------------------------------------------------------------------------------------

def test_head_bytes_match_a_real_exllamav2_head():
    """exllamav2's converter made this head (6 bits: 0.15 8b_128g / 0.85 6b_128g); the estimate is exact."""
    real = weight_bytes(str(EXL2["tiny_llama_b4.5"]))["lm_head_bytes"]
    assert real == exl2_head_bytes(256, 1024, 6)
    # by hand: 1 group of 128 rows at 8 bits + 1 of 128 at 6 bits -> 56 packed rows; K = 256
    parts = [56 * 1024 * 4, 2 * 128 * 4, 2 * 2, 2 * 2 * 2, 2 * 256, 2 * 256, 4 * 256]
    assert real == sum(alloc_bytes(x) for x in parts)


def test_one_linear_by_hand_from_the_fixture():
    """k_proj of layer 0 (tiny_qwen2_b6.5): every tensor exllamav2 keeps, rounded to torch's 512-byte blocks."""
    t = exl2_tensors(EXL2["tiny_qwen2_b6.5"])
    k = "model.layers.0.self_attn.k_proj"
    q_groups = read_i16(t[f"{k}.q_groups"])
    rows = _group_map_rows(q_groups, t[f"{k}.q_weight"].shape[0])
    assert rows == 256  # every input row appears once in the group map
    parts = [t[f"{k}.q_weight"].nbytes, t[f"{k}.q_scale"].nbytes, t[f"{k}.q_scale_max"].nbytes,
             t[f"{k}.q_groups"].nbytes, t[f"{k}.bias"].nbytes, 2 * 256, 2 * 256, 4 * rows]
    got, kind = _linear_from_file(t, k, drop_perm=False, out_features=128)
    assert kind == "exl2" and got == sum(alloc_bytes(x) for x in parts)
    # a second route: the format reader's own GPU layout of the same linear (unrounded), within the 512-B blocks
    reader = pytest.importorskip("helpers.format.reader")
    theirs = sum(reader.open_exl2(EXL2["tiny_qwen2_b6.5"]).linears[k].gpu_bytes().values())
    assert 0 <= got - theirs < 512 * len(parts)
    down, _ = _linear_from_file(t, "model.layers.0.mlp.down_proj", drop_perm=True, out_features=256)
    with_perm, _ = _linear_from_file(t, "model.layers.0.mlp.down_proj", drop_perm=False, out_features=256)
    assert with_perm - down == 2 * alloc_bytes(2 * 768)  # down_proj drops its int16 perms


@pytest.mark.parametrize("name", ["tiny_llama_b3.0", "tiny_llama_b4.5", "tiny_qwen2_b6.5"])
def test_exl2_folder_weights_agree_with_the_format_module(name):
    folder = EXL2[name]
    w = weight_bytes(str(folder))
    assert w["system_ram_bytes"] == 1024 * 256 * 2  # fp16 embedding stays on the CPU
    n_gpu_tensors = 2 * 7 * 8 + 7 + 2 * 3 + 1  # linears x ~8 tensors + head + norms: bounds the 512-B rounding
    # a second opinion: the format reader's own byte count of the same folder (it reads the tensors its own way)
    other = open_exl2(folder).byte_breakdown()
    assert 0 <= w["vram_bytes"] - other["vram_bytes"] <= 512 * n_gpu_tensors
    assert other["system_ram_bytes"] == w["system_ram_bytes"]
    # the estimate from config + bpw lands near the real checkpoint
    s = model_shape(str(folder))
    est = weight_bytes(dataclass_replace(s, exl2_dir=None), float(name.split("_b")[1]))
    assert abs(est["vram_bytes"] - w["vram_bytes"]) / w["vram_bytes"] < 0.03


def test_bpw_given_with_an_exl2_folder_is_ignored_with_a_warning():
    with pytest.warns(CourseWarning, match="ignored"):
        weight_bytes(str(EXL2["tiny_llama_b3.0"]), bpw=5.0)


def test_qwen14b_estimate():
    w = weight_bytes("qwen2.5-14b", 5.5)
    assert w["system_ram_bytes"] == 152064 * 5120 * 2
    # by hand, head option 6 (0.15 8b_128g / 0.85 6b_128g) over K = 5120 rows: 6 groups (768 rows, 192 packed rows) +
    # 34 groups (4352 rows, 816 packed rows). q_weight 1008 x 152064 x 4 B = 613,122,048; q_scale 40 x 19008 x 4 B =
    # 3,041,280; q_scale_max 80 B and q_groups 160 B (one 512-B block each); perms 2 x 10,240; group map 20,480
    assert w["lm_head_bytes"] == 613_122_048 + 3_041_280 + 512 + 512 + 2 * 10_240 + 20_480 == 616_205_312
    assert 6.3 < w["lm_head_bytes"] * 8 / (5120 * 152064) < 6.4  # ~6.33 bpw head
    assert 9.0 < w["vram_bytes"] / GIB < 9.1  # ~9.7 GB (decimal) read per decoded token


# --- scratch -----------------------------------------------------------------------------------------------------

def test_scratch_terms():
    q = model_shape("qwen2.5-14b")
    sc = scratch_bytes(LoadSetup(q, max_seq_len=32768))
    assert sc["device_scratch"] == 1 * GIB  # lm_head dequant buffer, 5120 x 152064 capped at max_dq_size (512 Mi halfs)
    assert sc["rope_tables"] == 16 * MIB  # sin + cos, 32768 x 128 fp16 each (8 MiB)
    assert sc["attention_transient"] == 640 * MIB + 128  # 2 x 2048^2 x 40 heads x 2 B, + 128
    assert sc["hidden_state_transient"] == 20 * MIB and sc["attn_mask_transient"] == 8 * MIB  # 2048-token chunk
    sm = model_shape("smollm2-135m")
    assert scratch_detail(LoadSetup(sm, max_seq_len=4096))["lm_head"] == 56_623_104  # 2 B x 576 x 49152: under the cap
    # max_input_len is clipped to max_seq_len (load_autosplit_gen), and so is the attention matrix: at 512 tokens
    # the MLP holds 512 x 576 fp16 + 128, two 512 x 1536 fp16 + 128 each, and a 576 x 1536 fp16 dequant buffer
    d = scratch_detail(LoadSetup(sm, max_seq_len=512))
    assert d["mlp"] == 589_952 + 2 * 1_572_992 + 1_769_472 == 5_505_408
    # 2 x 512^2 x 9 heads x 2 B
    assert scratch_bytes(LoadSetup(sm, max_seq_len=512))["attention_transient"] == 9 * MIB + 128


# --- breakdown, load order, planner ------------------------------------------------------------------------------

def test_seed_case_4k_fits_32k_does_not():
    short = plan(LoadSetup("qwen2.5-14b", gpus=16, bpw=5.5, max_seq_len=4096))
    long = plan(LoadSetup("qwen2.5-14b", gpus="RTX 4080 Super", bpw=5.5, max_seq_len=32768))
    assert short.fits and short.margin_bytes > 2 * GIB  # with room
    assert not long.fits and long.margin_bytes < 0
    assert long.kv_cache_bytes == 6 * GIB
    # 8x the context: the cache grows from 0.75 to 6 GiB, the RoPE tables from 2 to 16 MiB, and without flash-attn
    # the repeat_kv copy of one layer (2 x 40 heads x 128 x 2 B per position) from 80 to 640 MiB; nothing else changes
    assert long.breakdown.vram_total_bytes - short.breakdown.vram_total_bytes == (6 * GIB - 0.75 * GIB + 14 * MIB
                                                                                  + 560 * MIB)
    doc = json.loads(long.to_json())
    assert doc["fits"] is False and doc["kv_cache_bytes"] == 6 * GIB
    assert "q6 keeps 32,768" in long.recommendation and "sysmem fallback" in long.recommendation


def test_longest_context_is_the_edge():
    p = plan(LoadSetup("qwen2.5-14b", gpus=16, bpw=5.5, max_seq_len=4096, cuda_context_gib=0.5, reserve_gib=0.5))
    lc = p.longest_context
    assert all(v % 256 == 0 for v in lc.values())
    assert lc["q4"] > lc["q6"] > lc["q8"] > lc["fp16"] > 4096
    for mode, n in lc.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # beyond 32k tokens: the RoPE warning, tested elsewhere
            ok = plan(p.setup.with_(max_seq_len=n, cache_mode=mode))
            over = plan(p.setup.with_(max_seq_len=n + 256, cache_mode=mode))
        assert ok.fits and not over.fits, mode


def test_load_order_sums_to_the_breakdown():
    for spec, bpw in (("qwen2.5-7b", 4.0), (str(EXL2["tiny_qwen2_b6.5"]), None)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bd = breakdown(LoadSetup(spec, bpw=bpw, max_seq_len=2048, cache_mode="q4"))
            order = load_order(LoadSetup(spec, bpw=bpw, max_seq_len=2048, cache_mode="q4"))
        assert order[0]["module"] == "model.embed_tokens" and order[0]["device_hint"] == "cpu"
        assert order[-1]["module"] == "lm_head" and order[-2]["module"] == "model.norm"
        gpu = [e for e in order if e["device_hint"] == "gpu"]
        assert sum(e["weight_bytes"] for e in gpu) == bd.weights_bytes
        assert sum(e["cache_bytes"] for e in order) == bd.kv_cache_bytes
        assert sum(e["scratch_bytes"] for e in order) == bd.scratch_bytes
        att = [e for e in order if e["kind"] == "attention"]
        assert len(att) == bd.n_layers and all(e["cache_bytes"] > 0 for e in att)
        assert [e["kind"] for e in order[3:7]] == ["attention", "mlp", "attention", "mlp"]


def test_load_order_of_model_load_puts_the_whole_cache_after_the_weights():
    auto = load_order(LoadSetup("qwen2.5-7b", bpw=4.0, max_seq_len=2048, cache_mode="q4"))
    load = load_order(LoadSetup("qwen2.5-7b", bpw=4.0, max_seq_len=2048, cache_mode="q4"), path="load")
    n = model_shape("qwen2.5-7b").n_layers
    for key in ("weight_bytes", "cache_bytes", "scratch_bytes"):
        assert sum(e[key] for e in load) == sum(e[key] for e in auto), key
    kinds = [e["kind"] for e in load]
    assert kinds[-n - 1:] == ["cache"] * n + ["cache_temp"]         # ExLlamaV2Cache_Q4: layers, then its temp K/V
    assert load[-n - 2]["module"] == "lm_head"
    assert all(e["cache_bytes"] == 0 for e in load[: -n - 1])
    per_layer = [e["cache_bytes"] for e in auto if e["kind"] == "attention"]
    assert [e["cache_bytes"] for e in load if e["kind"] == "cache"] == per_layer
    with pytest.raises(CourseError, match="unknown load path 'lazy'"):
        load_order(LoadSetup("qwen2.5-7b", bpw=4.0, max_seq_len=2048), path="lazy")


def test_plan_warns_when_load_autosplit_reserve_does_not_fit():
    kw = dict(bpw=5.5, cuda_context_gib=0.5, reserve_gib=0.25)
    longest = plan(LoadSetup("qwen2.5-14b", gpus="RTX 4080 Super", max_seq_len=4096, **kw)).longest_context["fp16"]
    edge = plan(LoadSetup("qwen2.5-14b", gpus="RTX 4080 Super", max_seq_len=longest, **kw))
    assert edge.fits and 0 <= edge.margin_bytes < LOAD_AUTOSPLIT_RESERVE_BYTES
    assert edge.autosplit_margin_bytes == edge.margin_bytes - 448 * MIB < 0
    assert "Tight: model.load_autosplit(cache) holds 0.44 GiB more" in edge.recommendation
    assert json.loads(edge.to_json())["autosplit_margin_bytes"] == edge.autosplit_margin_bytes
    roomy = plan(LoadSetup("qwen2.5-14b", gpus="RTX 4080 Super", max_seq_len=4096, **kw))
    assert roomy.margin_bytes > 448 * MIB and "Tight" not in roomy.recommendation


def test_context_beyond_training_warns_not_errors():
    with pytest.warns(CourseWarning, match="YaRN"):
        bd = breakdown(LoadSetup("qwen2.5-14b", bpw=5.5, max_seq_len=65536))
    assert bd.kv_cache_bytes == 12 * GIB
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        breakdown(LoadSetup("qwen2.5-14b", bpw=5.5, max_seq_len=32768))  # at the limit: no warning


@pytest.mark.parametrize("kw, match", [
    (dict(max_seq_len=-5), "positive whole number"),
    (dict(max_seq_len=0), "positive whole number"),
    (dict(max_seq_len=10**9), "absurd"),
    (dict(max_seq_len=4096.5), "whole number"),
    (dict(max_seq_len=4096, bpw=0), "positive"),
    (dict(max_seq_len=4096, bpw=100), "2.0 to 8.0"),
    (dict(max_seq_len=4096, cache_mode="int4"), "fp16, fp8, q8, q6, q4"),
    (dict(max_seq_len=4096, head_bits=7), "head option"),
    (dict(max_seq_len=4096, batch=0), "batch"),
    (dict(max_seq_len=4096, reserve_gib=-1), "reserve"),
])
def test_bad_sizes_are_clear(kw, match):
    kw.setdefault("bpw", 5.5)
    with pytest.raises(CourseError, match=match):
        breakdown(LoadSetup("qwen2.5-14b", **kw))


def test_gpus():
    g = gpu_spec("RTX 4080 Super")
    assert (g["vram_gib"], g["bandwidth_gbs"], g["pcie_gen"], g["pcie_lanes"]) == (16, 736, 4, 16)
    assert g["vram_bytes"] == 16 * GIB and g["pcie_gbs"] == 31.5
    assert gpu_spec("nvidia geforce rtx 4080 super")["name"] == "RTX 4080 Super"
    assert gpu_spec("4090")["vram_gib"] == 24 and gpu_spec("16 GB")["vram_bytes"] == 16 * GIB
    assert gpu_spec("RTX 3090", bandwidth_gbs=900)["bandwidth_gbs"] == 900
    with pytest.raises(CourseError, match="Did you mean"):
        gpu_spec("RTX 4080 Suprr")
    for bad in (-16, 0, 100000):
        with pytest.raises(CourseError):
            gpu_spec(bad)


def test_cuda_context_default_and_recorded(tmp_path):
    b, src = cuda_context_default(tmp_path)
    assert b == DEFAULT_CUDA_CONTEXT_BYTES and src.startswith("default")
    (tmp_path / "memory").mkdir()
    rows = [{"kind": "cuda_context", "cuda_context_bytes": v, "cuda_libraries_bytes": 10} for v in (500, 300, 400)]
    doc = {"provenance": {"gpu": "Some GPU", "date": "2026-01-02T00:00:00"}, "rows": rows}
    (tmp_path / "memory" / "cuda-context.json").write_text(json.dumps(doc))
    b, src = cuda_context_default(tmp_path)
    assert b == 410 and src.startswith("measured") and "Some GPU" in src


def test_simple_calculator_formula():
    s = model_shape("qwen2.5-14b")
    # 14,770,033,664 params x 5.5 / 8 = 10,154,398,144 B; plus K and V, 48 layers x 1024 values x 32768 tokens x 2 B
    assert simple_calculator_bytes(LoadSetup(s, bpw=5.5, max_seq_len=32768)) == 10_154_398_144 + 6 * GIB
    assert simple_calculator_bytes(LoadSetup(s, bpw=5.5, max_seq_len=32768), kv_bits=4) == 10_154_398_144 + 1.5 * GIB
    # the popular formula misses exllamav2's scratch, context and reserve: it falls short of the real total
    row, = calculator_rows([LoadSetup("qwen2.5-14b", bpw=5.5, max_seq_len=32768)])
    assert row["simple_gib"] < row["exllamav2_gib"] and row["error_pct"] < 0


def test_table_shows_gib_units():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = breakdown(LoadSetup("smollm2-135m", bpw=4.0, max_seq_len=4096)).table()
    assert "GiB" in t and "KV cache" in t and "CUDA context" in t


# --- CLI ---------------------------------------------------------------------------------------------------------

def test_cli_plan_json_and_errors(capsys):
    from helpers.__main__ import main

    assert main(["plan", "--model", "qwen2.5-14b", "--bpw", "5.5", "--ctx", "32768", "--cache", "fp16",
                 "--gpu-gib", "16", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["fits"] is False and doc["kv_cache_bytes"] == 6 * GIB
    assert main(["plan", "--model", "qwen2.5-14b", "--bpw", "5.5", "--max-seq-len", "32768", "--gpu-gib", "16",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == doc  # --ctx is an alias of --max-seq-len
    assert main(["plan", "--model", "qwen2.5-14b", "--bpw", "5.5", "--ctx", "4096", "--gpu", "RTX 4080 Super"]) == 0
    out = capsys.readouterr().out
    assert "FITS" in out and "GiB" in out
    assert main(["plan", "--model", "qwen2.5-41b", "--bpw", "5.5", "--gpu-gib", "16"]) == 2
    assert "Did you mean" in capsys.readouterr().err
    assert main(["plan", "--model", "qwen2.5-14b", "--bpw", "5.5", "--cache", "q5", "--gpu-gib", "16"]) == 2
    assert "q4" in capsys.readouterr().err
    assert main(["plan", "--model", "qwen2.5-14b", "--bpw", "5.5", "--ctx", "65536", "--gpu-gib", "24"]) == 0
    out, err = capsys.readouterr()
    assert (out + err).count("is beyond the 32,768 positions") == 1 and "YaRN" in out   # said once, for Qwen2.5
    assert main(["plan", "--model", str(EXL2["tiny_llama_b3.0"]), "--gpu", "RTX 3060 12GB", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fits"] is True


def test_gpu_recordings_are_registered_and_refuse_without_cuda():
    assert set(GPU_RECORDINGS) == {"memory_cuda_context", "memory_predicted_vs_measured_14b",
                                   "memory_predicted_vs_measured_embedded"}
    from helpers.core import devices as gpu

    if gpu.cuda_status()["available"]:
        pytest.skip("a CUDA GPU is here")
    for fn in GPU_RECORDINGS.values():
        with pytest.raises(CourseError, match="CUDA"):
            fn()


# --- an external allocator count beside the course's prediction ---------------------------------------------------

def _external_source(tmp_path, **memory):
    doc = {"what": "w", "bandwidth": {"hbm_read_gbs": 2857}, "caveats": ["c"],
           "provenance": {"gpu": "NVIDIA H100 80GB HBM3", "driver": "1", "cuda_torch": "torch 2.11", "python": "3.12",
                          "exllamav2": "0.3.2 (x)", "flash_attn": False, "date": "2026-11-25",
                          "harness": "external: a script",
                          "method": "ExLlamaV2Config with max_input_len 2048 and max_attention_size 2048^2; "
                                    "ExLlamaV2Cache(lazy) + model.load_autosplit(cache)",
                          "model": "Qwen2.5-14B shape (48 layers): two random layers converted by exllamav2's own "
                                   "converter at 5.5 bpw (head 6 bits), replicated to 48 layers"},
           "memory": memory or {"torch_bytes_allocated_by_exllamav2_at_cache_4096_gib": 10.73, "method": "m"},
           "rows": [{"run": 1, "cache_len": 4096, "depth": 128, "decode_tok_s": 63.6, "load_s": 9.3}]}
    src = tmp_path / "h100.json"
    src.write_text(json.dumps(doc))
    return src


def test_external_memory_figure_is_labelled_external_beside_a_hand_computed_prediction(tmp_path):
    import hashlib

    from helpers.memory.recorded import external_points, recorded_report
    from helpers.recordings.memory import import_external_memory

    src = _external_source(tmp_path)
    path = import_external_memory(src, results_dir=tmp_path / "results")
    assert path == tmp_path / "results" / "memory" / "external-h100.json"
    (p,) = external_points(tmp_path / "results")
    assert p["external"] and p["label"].startswith("external: measured on NVIDIA H100 80GB HBM3, 2026-11-25")
    assert p["provenance"]["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert p["measured_gib"] == 10.73  # the figure, untouched
    r = p["row"]
    assert (r["model_config"], r["bpw"], r["head_bits"], r["cache_mode"], r["max_seq_len"]) == (
        "qwen2.5-14b", 5.5, 6, "fp16", 4096)
    assert (r["max_input_len"], r["max_attention_size"], r["flash_attn"]) == (2048, 2048**2, False)
    bd = p["predicted"]
    # by hand, per layer at 5.5 bpw (numel x 5.5 / 8, + 4 B per input row for the GPU's perms and group map, except
    # down_proj): q and o 18,022,400 + 20,480 each; k and v 3,604,480 + 20,480 each; gate and up 48,660,480 + 20,480
    # each; down 48,660,480; two fp16 norms 2 x 10,240 = 189,378,560 B. 48 layers + the final norm (10,240) + the
    # 6-bit head (616,205,312, test_qwen14b_estimate) = 9,706,386,432 B
    layer = 2 * 18_042_880 + 2 * 3_624_960 + 2 * 48_680_960 + 48_660_480 + 2 * 10_240
    assert layer == 189_378_560 and bd.weights_bytes == 48 * layer + 10_240 + 616_205_312 == 9_706_386_432
    assert bd.kv_cache_bytes == 48 * 4096 * 2 * 8 * 128 * 2 == 805_306_368  # K and V, 8 KV heads of 128, fp16
    assert bd.scratch_bytes == 2 * 536_870_912 + 2 * 4096 * 128 * 2 == 1_075_838_976  # head dequant cap + RoPE
    # neither the CUDA context nor the desktop reserve: an allocator count cannot see them
    assert bd.cuda_context_bytes == 0 and bd.reserve_bytes == 0
    assert bd.exllamav2_resident_bytes == 9_706_386_432 + 805_306_368 + 1_075_838_976 == 11_587_531_776
    assert p["ratio"] == pytest.approx(10.73 / (11_587_531_776 / GIB))
    text = recorded_report(tmp_path / "results")
    assert text.startswith("the course's own recordings: not recorded yet")
    assert "external: measured on NVIDIA H100" in text and "recorded on" not in text
    assert f"measured / predicted = {p['ratio']:.4f}" in text and "10.73 " in text and "10.792 GiB" in text
    from helpers import plots

    ax = plots.plot_predicted_vs_measured([], external=[p]).axes[0]
    assert any("external (NVIDIA H100 80GB HBM3)" in (c.get_label() or "") for c in ax.collections)


def test_external_memory_import_refuses_a_figure_without_its_configuration(tmp_path):
    from helpers.memory.recorded import NOT_RECORDED, recorded_report
    from helpers.recordings.memory import import_external_memory

    assert recorded_report(tmp_path) == NOT_RECORDED
    with pytest.raises(CourseError, match="no torch_bytes_allocated_by_exllamav2_at_cache"):
        import_external_memory(_external_source(tmp_path, other_gib=1.0), results_dir=tmp_path)
    src = _external_source(tmp_path)
    doc = json.loads(src.read_text())
    doc["provenance"]["method"] = "load_autosplit, ExLlamaV2Cache(lazy)"
    src.write_text(json.dumps(doc))
    with pytest.raises(CourseError, match="does not state max_input_len"):
        import_external_memory(src, results_dir=tmp_path)


def test_imported_external_memory_record_matches_its_speed_record():
    from helpers.core.paths import RESULTS_DIR
    from helpers.memory.recorded import external_points

    speed = sorted((RESULTS_DIR / "speed").glob("external-*.json"))
    if not speed:
        pytest.skip("no external record is imported (scripts/import_external.py)")
    points = {Path(p["provenance"]["source_file"]).name: p for p in external_points()}
    for path in speed:
        doc = json.loads(path.read_text(encoding="utf-8"))
        p = points[doc["provenance"]["source_file"]]
        assert p["provenance"] == doc["provenance"] and p["external"]
        assert doc["memory"][p["row"]["source_field"].removeprefix("memory.")] == p["measured_gib"]


def test_repeat_kv_copy_is_counted_without_flash_attn_only():
    from helpers.memory.scratch import attention_scratch_space, repeat_kv_bytes, scratch_detail

    # by hand: K and V of one layer at 40 query heads x 128 x 2 bytes for 32,768 positions, + exllamav2's 128
    assert repeat_kv_bytes(LoadSetup("qwen2.5-14b", max_seq_len=32768)) == 2 * 40 * 32768 * 128 * 2 + 128
    assert repeat_kv_bytes(LoadSetup("qwen2.5-14b", max_seq_len=32768)) / GIB == pytest.approx(0.625, abs=1e-6)
    assert repeat_kv_bytes(LoadSetup("qwen2.5-14b", max_seq_len=32768, flash_attn=True)) == 0
    no = breakdown(LoadSetup("qwen2.5-14b", bpw=5.5, max_seq_len=32768))
    fa = breakdown(LoadSetup("qwen2.5-14b", bpw=5.5, max_seq_len=32768, flash_attn=True))
    assert no.repeat_kv_bytes == 2 * 40 * 32768 * 128 * 2 + 128 and fa.repeat_kv_bytes == 0
    assert no.transient_bytes == no.attention_transient_bytes + no.hidden_state_transient_bytes + no.repeat_kv_bytes
    # set_device_map (a manual gpu_split) reserves attn.py scratch_space(): the fixed part + temp_q/k/v + temp_kv
    fixed = scratch_detail(LoadSetup("qwen2.5-14b", max_seq_len=32768))["attention"]
    qkv = (2048 * 5120 * 2 + 128) + 2 * (2048 * 1024 * 2 + 128)
    assert attention_scratch_space(LoadSetup("qwen2.5-14b", max_seq_len=32768)) == fixed + qkv + no.repeat_kv_bytes
