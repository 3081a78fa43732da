"""K/V stored as exllamav2 0.3.2's cache modes store them (helpers/engines/kv_quant.py): the rotation, the exact
group and byte layout, the round-trip error bounds, and the decoder with a quantized cache."""
from __future__ import annotations

import pytest
import torch

from helpers.engines import kv_quant as Q
from helpers.engines.reference import KVCache, ReferenceModel
from helpers.memory import kv_cache
from helpers.specs import shapes


def _x(n_tokens=16, dim=192, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_tokens, dim, generator=g) * scale


def test_rotation_is_two_interleaved_32_point_hadamards():
    h = Q.sylvester(32)
    assert torch.equal(h @ h.T, 32 * torch.eye(32))                       # its own inverse up to 32
    x = _x(50, 64).half().double()
    y = Q.hadamard32(x).double()
    want = torch.empty_like(x)
    want[:, 0::2], want[:, 1::2] = x[:, 0::2] @ h.double().T, x[:, 1::2] @ h.double().T
    assert torch.allclose(y, want, rtol=2 ** -10, atol=2 ** -9)           # fp16 rounding of the result only
    # the kernel's butterfly (fp16 rounding after each of its 5 rounds) is within a few fp16 steps of it
    b = Q.hadamard32(x, butterfly=True).double()
    step = 2.0 ** (torch.floor(torch.log2(want.abs().max())) - 10)
    assert (b - want).abs().max() <= 4 * step


@pytest.mark.parametrize("bits", [8, 4])
def test_group_layout_and_scales(bits):
    x = _x()
    codes, scales = Q.quantize(x, bits)
    assert codes.shape == x.shape and codes.dtype == torch.uint8 and int(codes.max()) < 2 ** bits
    assert scales.shape == (16, 192 // 32) and scales.dtype == torch.float16
    # one scale per 32 consecutive *stored* (rotated) values: absmax / 2^(bits-1)
    w = Q.hadamard32(x.reshape(-1, 64)).reshape(16, 192)
    absmax = w.abs().reshape(16, 6, 32).amax(-1)
    assert torch.equal(scales, absmax * torch.tensor(1 / 2 ** (bits - 1), dtype=torch.float16))
    packed = Q.pack(codes, bits)
    assert packed.shape == (16, 192 * bits // 8)
    if bits == 4:                                                          # value 2k low nibble, 2k+1 high nibble
        assert torch.equal(packed & 0xF, codes[:, 0::2]) and torch.equal(packed >> 4, codes[:, 1::2])


def test_stored_bytes_match_exllamav2s_layout():
    """Codes + scales of one token equal what helpers.memory.kv_cache says exllamav2 allocates per token and layer."""
    shape = shapes.model_shape("smollm2-135m")
    dim = shape.n_kv_heads * shape.head_dim
    x = _x(1, dim)
    for mode, (bk, bv) in Q.CACHE_BITS.items():
        stored = 0
        for bits in (bk, bv):
            codes, scales = Q.quantize(x, bits)
            stored += Q.pack(codes, bits).numel() + 2 * scales.numel()
        assert stored == kv_cache.kv_layer_bytes_per_token(shape, mode), mode
    assert Q.fp8_encode(x).numel() * 2 == kv_cache.kv_layer_bytes_per_token(shape, "fp8")


@pytest.mark.parametrize("bits", [8, 4])
def test_round_trip_error_bound(bits):
    """In the rotated domain each value is off by at most half a step (a full step for the clamped top code), plus
    fp16 rounding; the rotation is orthogonal up to sqrt(32), so per 32 values the L2 error is bounded by the same."""
    x = _x(64, 192, scale=3.0)
    codes, scales = Q.quantize(x, bits)
    step = scales.float().repeat_interleave(32, -1)
    w = Q.hadamard32(x.reshape(-1, 64)).float().reshape(x.shape)
    w_back = (codes.float() - 2 ** (bits - 1)) * step
    # half a step, plus the fp16 rounding of w / absmax x 2^(b-1) + 2^(b-1) (up to 1/8 of a step at 8 bits); the top
    # code is clamped (2^b would not fit), so values rounding up to it may be off by up to a full step
    err = (w - w_back).abs()
    top = codes == 2 ** bits - 1
    assert (err <= step * (1 + 2 ** -6)).all()
    assert (err[~top] <= step[~top] * (0.5 + 2 ** -3)).all()
    y = Q.dequantize(codes, scales, bits).float()
    err = (x - y).reshape(-1, 32, 2).norm(dim=1)                            # per Hadamard group (32 lanes, one half)
    bound = step.reshape(-1, 64).amax(-1, keepdim=True)                    # ||e_x|| = ||e_w|| / sqrt(32) <= max step
    slack = 2 ** -10 * x.reshape(-1, 32, 2).norm(dim=1) + 2 ** -9          # fp16 rounding of the read-back values
    assert (err <= bound * 1.01 + slack).all()
    rel = float((x - y).norm() / x.norm())
    assert rel < {8: 0.01, 4: 0.15}[bits], rel


def test_rotation_helps_with_outliers():
    """A few large values per group: quantized after the rotation (as exllamav2 does) the error is smaller than
    plain round-to-nearest with the same 4-bit codes and one absmax scale per 32 values."""
    x = _x(64, 192, scale=1.0)
    x[:, ::29] *= 8.0                                                       # about one outlier in each 32 values

    def plain(t, bits=4):
        g = t.reshape(-1, 32)
        step = g.abs().amax(-1, keepdim=True) / 2 ** (bits - 1)
        return (torch.round(g / step).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * step).reshape(t.shape)

    rotated = float((x - Q.roundtrip(x, "q4")).norm())
    assert rotated < 0.8 * float((x - plain(x)).norm())


def test_fp8_is_e5m2_by_truncation():
    x = torch.tensor([1.0, -1.0, 1.3, 1.7, 3.9, -0.3, 0.0, 65504.0])
    y = Q.fp8_decode(Q.fp8_encode(x)).float()
    # 2 mantissa bits, cut towards zero: 1.3 -> 1.25, 1.7 -> 1.5, 3.9 -> 3.5, -0.3 -> -0.25 (truncated, not rounded)
    assert y.tolist() == [1.0, -1.0, 1.25, 1.5, 3.5, -0.25, 0.0, 57344.0]
    r = _x(32, 64)
    back = Q.roundtrip(r, "fp8")
    assert ((back.abs() <= r.half().float().abs()) & ((r - back).abs() <= 0.25 * r.abs() + 1e-7)).all()


def test_q6_stores_k_in_8_bits_and_v_in_4():
    x = _x()
    assert torch.equal(Q.roundtrip(x, "q6", part="k"), Q.roundtrip(x, "q8"))
    assert torch.equal(Q.roundtrip(x, "q6", part="v"), Q.roundtrip(x, "q4"))


def test_width_must_be_whole_blocks():
    from helpers.core.errors import CourseError

    with pytest.raises(CourseError, match="multiple of 64"):
        Q.quantize(torch.zeros(2, 96), 4)


def _tiny_model(max_seq_len=24):
    cfg = {"architectures": ["LlamaForCausalLM"], "vocab_size": 50, "hidden_size": 128, "intermediate_size": 96,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 10000.0,
           "max_position_embeddings": 64, "tie_word_embeddings": True}
    g = torch.Generator().manual_seed(1)
    state = {"model.embed_tokens.weight": torch.randn(50, 128, generator=g), "model.norm.weight": torch.ones(128)}
    for i in range(2):
        p = f"model.layers.{i}."
        for n, shape in {"self_attn.q_proj": (128, 128), "self_attn.k_proj": (64, 128),
                         "self_attn.v_proj": (64, 128), "self_attn.o_proj": (128, 128), "mlp.gate_proj": (96, 128),
                         "mlp.up_proj": (96, 128), "mlp.down_proj": (128, 96)}.items():
            state[p + n + ".weight"] = torch.randn(*shape, generator=g) * 0.1
        state[p + "input_layernorm.weight"] = torch.ones(128)
        state[p + "post_attention_layernorm.weight"] = torch.ones(128)
    return ReferenceModel.from_state_dict(cfg, state, max_seq_len=max_seq_len)


def _decode_one_by_one(model, ids):
    model.forward(ids[None, :1])
    out = []
    for t in ids[1:].tolist():
        out.append(model.decode_step(t))
    return torch.stack(out)


def test_one_pass_equals_decoding_token_by_token():
    """The quantized cache's one pass gives each token its own K/V exact and earlier ones dequantized: the same
    logits as decoding one token at a time with that cache."""
    model = _tiny_model()
    ids = torch.randint(0, 50, (12,), generator=torch.Generator().manual_seed(2))
    cfg = model.config.shape
    model.cache = Q.QuantizedKVCache(cfg.n_layers, 24, cfg.n_kv_heads, cfg.head_dim, mode="q4")
    one_pass = model.forward(ids[None])[0, 1:]
    step_by_step = _decode_one_by_one(model, ids)
    assert torch.allclose(one_pass, step_by_step, atol=1e-4)
    # and it differs from an exact cache, which in turn equals the plain KVCache
    exact = Q.QuantizedKVCache(cfg.n_layers, 24, cfg.n_kv_heads, cfg.head_dim, mode="fp16")
    model.cache = exact
    fp16 = model.forward(ids[None])[0, 1:]
    model.cache = KVCache(cfg.n_layers, 24, cfg.n_kv_heads, cfg.head_dim)
    plain = model.forward(ids[None])[0, 1:]
    assert float((fp16 - plain).norm() / plain.norm()) < 1e-3                   # fp16 rounding only
    assert float((one_pass - plain).norm() / plain.norm()) > 1e-3               # 4 bits are visible


def test_cache_quality_table():
    """A small version of notebook 01's table (on a tiny EXL2 fixture made by exllamav2's converter): FP16 is the
    baseline; Q8 strays least, Q4 more."""
    from pathlib import Path

    from helpers.lessons import cache_quality as CQ

    fixture = Path(__file__).parent / "fixtures" / "exl2" / "tiny_llama_b4.5"
    rows = CQ.cache_quality(("fp16", "q8", "q4"), model=fixture, scored=8, long_depth=24, show_progress=False)
    by = {r["mode"]: r for r in rows}
    assert list(by) == ["fp16", "q8", "q4"]
    for depth in ("short", "long"):
        assert by["fp16"][depth]["agree"] == 1.0 and by["fp16"][depth]["kl"] == 0.0
        assert by["q8"][depth]["kl"] < by["q4"][depth]["kl"]
    assert rows[0]["depths"] == {"short": (0, 7), "long": (24, 31)}
    assert by["q4"]["bytes_per_token"] < by["q8"]["bytes_per_token"]   # (2 layers: the FP16 temp layer outweighs Q8)
    text = CQ.format_cache_quality(rows)
    assert "positions 24-31" in text and len(text.splitlines()) == 5
