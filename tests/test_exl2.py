"""The EXL2 format library against checkpoints made by exllamav2's own converter, plus writer round trips."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import exl2
from helpers.errors import CourseError

torch.set_num_threads(2)
FIXTURES = Path(__file__).parent / "fixtures" / "exl2"
NAMES = ["tiny_llama_b3.0", "tiny_llama_b4.5", "tiny_qwen2_b6.5"]


@pytest.fixture(scope="module", params=NAMES)
def fixture(request):
    d = FIXTURES / request.param
    return exl2.open_exl2(d), load_file(str(d / "exllamav2_truth.safetensors"))


def runtime_order(ckpt, q, w_t):
    """exllamav2 folds down_proj's act-order permutation into the MLP's intermediate dimension."""
    if q.kind in ("gate_proj", "up_proj"):
        return w_t[:, ckpt.linears[f"model.layers.{q.layer}.mlp.down_proj"].perm]
    if q.kind == "down_proj":
        return w_t[q.perm]
    return w_t


# ---------------------------------------------------------------------------------------------------- reading
def test_dequantize_matches_exllamav2(fixture):
    ckpt, truth = fixture
    assert len(ckpt.linears) == 2 * 7 + 1
    for name, q in ckpt.linears.items():
        w = q.dequantize()
        assert w.shape == (q.out_features, q.in_features)
        tr = truth[f"{name}.weight_dq_t"].float()[:, :q.out_features]
        got = runtime_order(ckpt, q, w.T)
        rel = ((got - tr).abs().max() / tr.abs().max()).item()
        assert rel < 0.01, (name, rel)
        # we round scales as exllamav2 does, so in fp16 the two agree bit for bit
        assert torch.equal(got.half(), tr.half()), name


def test_all_bit_widths_are_exercised_by_the_fixtures():
    seen = set()
    for n in NAMES:
        seen |= set(exl2.open_exl2(FIXTURES / n).bits_histogram())
    assert seen == {2, 3, 4, 5, 6, 8}
    assert 2 in exl2.open_exl2(FIXTURES / "tiny_llama_b3.0").bits_histogram()


def test_bits_per_weight_is_near_the_converters_target():
    for n in NAMES:
        target = float(n.split("_b")[1])
        ckpt = exl2.open_exl2(FIXTURES / n)
        assert abs(ckpt.bits_per_weight - target) < 0.05, (n, ckpt.bits_per_weight)
        assert ckpt.config["quantization_config"]["bits"] == target


def test_counting_of_one_linear_by_hand():
    ckpt = exl2.open_exl2(FIXTURES / "tiny_llama_b3.0")
    q = ckpt.linears["model.layers.0.self_attn.k_proj"]
    assert q.groups == [(3, 64), (2, 64), (2, 64), (2, 64)]
    assert (q.in_features, q.out_features) == (256, 128)
    # q_weight 18x128 int32, q_scale 4x16 int32, q_scale_max 4 fp16, q_groups 8 int16, q_invperm 256 int32
    bits = 8 * (18 * 128 * 4 + 4 * 16 * 4 + 4 * 2 + 8 * 2 + 256 * 4)
    assert q.stored_bits == bits
    assert q.bits_per_weight == pytest.approx(bits / (256 * 128))
    assert q.mix() == "0.25:3b/0.75:2b"
    # GPU: + group map (2 int16 per row) + q_perm/q_invperm as int16, q_groups int16, q_scale_max fp16
    gb = q.gpu_bytes()
    assert gb["q_meta"] == 4 * 2 + 8 * 2 + 256 * 4 + 2 * 256 * 2
    assert ckpt.linears["model.layers.0.mlp.down_proj"].gpu_bytes()["q_meta"] == 24 * 2 + 48 * 2 + 768 * 4


def test_codes_and_scales_decode_consistently(fixture):
    ckpt, _ = fixture
    q = ckpt.linears["model.layers.1.mlp.down_proj"]
    codes, scales = q.codes(), q.scales()
    assert codes.shape == (q.in_features, q.padded_out_features) and codes.dtype == torch.uint8
    assert scales.shape == (len(q.groups), q.padded_out_features)
    bits = torch.tensor([b for b, r in q.groups]).repeat_interleave(torch.tensor([r for b, r in q.groups]))
    assert int((codes.to(torch.int64) >> bits[:, None]).max()) == 0  # every code fits its width
    g = q.group_of_row()
    manual = (codes.float() - 2.0 ** (bits[:, None] - 1)) * scales[g]
    assert torch.equal(manual[q.invperm].T, q.dequantize())


def test_float_state_dict_names_and_layouts(fixture):
    ckpt, _ = fixture
    sd = ckpt.float_state_dict(torch.float32)
    cfg = ckpt.config
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    assert sd["model.embed_tokens.weight"].shape == (v, h)
    assert sd["lm_head.weight"].shape == (v, h)
    assert sd["model.layers.0.self_attn.q_proj.weight"].shape == (h, h)
    assert sd["model.layers.1.mlp.down_proj.weight"].shape == (h, cfg["intermediate_size"])
    assert sd["model.norm.weight"].dtype == torch.float32
    assert not any("q_" in k.rsplit(".", 1)[-1] for k in sd)
    has_bias = cfg["architectures"][0].startswith("Qwen2")
    assert ("model.layers.0.self_attn.k_proj.bias" in sd) == has_bias
    assert not any(k.endswith("weight_dq_t") for k in sd)  # the truth file beside the checkpoint is ignored


def test_byte_breakdown_adds_up():
    ckpt = exl2.open_exl2(FIXTURES / "tiny_qwen2_b6.5")
    bb = ckpt.byte_breakdown()
    assert bb["vram_bytes"] == sum(bb["by_kind"].values())
    assert bb["vram_bytes"] == bb["decoder_linear_bytes"] + bb["head_bytes"] + bb["norm_bytes"]
    assert bb["system_ram_bytes"] == 1024 * 256 * 2  # the embedding, fp16, on the CPU
    assert bb["disk_bytes"] == (FIXTURES / "tiny_qwen2_b6.5" / "output.safetensors").stat().st_size
    assert bb["by_kind"]["bias"] == 2 * 2 * (256 + 128 + 128)
    assert bb["norm_bytes"] == 2 * (2 * 2 * 256 + 256)
    assert bb["head"] == "exl2"
    assert sum(r["vram_bytes"] for r in ckpt.layer_table()) == bb["decoder_linear_bytes"] + bb["head_bytes"]


def test_layer_table_rows():
    rows = exl2.open_exl2(FIXTURES / "tiny_llama_b4.5").layer_table()
    assert [r["kind"] for r in rows][:7] == list(exl2.LINEAR_KINDS)
    assert [r["name"] for r in rows][:2] == ["model.layers.0.self_attn.q_proj",
                                                 "model.layers.0.self_attn.k_proj"]
    assert rows[-1]["name"] == "lm_head" and rows[-1]["layer"] is None
    for r in rows:
        assert sum(r["bits"].values()) == r["in"]
        assert 2.5 < r["bpw"] < 9


# --------------------------------------------------------------------------------------------------- bad input
def _copy(tmp_path, name="tiny_llama_b3.0"):
    d = tmp_path / name
    shutil.copytree(FIXTURES / name, d)
    (d / "exllamav2_truth.safetensors").unlink()
    return d


def _one_line(exc_info):
    msg = str(exc_info.value)
    assert "\n" not in msg and len(msg) < 400
    return msg


def test_missing_directory(tmp_path):
    with pytest.raises(CourseError) as e:
        exl2.open_exl2(tmp_path / "nope")
    assert "does not exist" in _one_line(e)


def test_missing_config(tmp_path):
    d = _copy(tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(CourseError) as e:
        exl2.open_exl2(d)
    assert "config.json" in _one_line(e)


def test_not_an_exl2_checkpoint(tmp_path):
    d = tmp_path / "float"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"hidden_size": 8}))
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(8, 8)}, str(d / "model.safetensors"))
    with pytest.raises(CourseError) as e:
        exl2.open_exl2(d)
    assert "not an EXL2 checkpoint" in _one_line(e)
    (d / "model.safetensors").unlink()
    with pytest.raises(CourseError) as e:
        exl2.open_exl2(d)
    assert "no *.safetensors" in _one_line(e)


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.0005])
def test_truncated_or_corrupt_file(tmp_path, keep):
    d = _copy(tmp_path)
    f = d / "output.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CourseError) as e:
        exl2.open_exl2(d)
    assert "corrupt" in _one_line(e)


def test_garbage_header(tmp_path):
    d = _copy(tmp_path)
    (d / "output.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CourseError) as e:
        exl2.open_exl2(d)
    assert "corrupt" in _one_line(e)


def _rewrite(d, edit):
    f = d / "output.safetensors"
    t = load_file(str(f))
    edit(t)
    save_file({k: v.contiguous() for k, v in t.items()}, str(f))


def test_missing_tensor(tmp_path):
    d = _copy(tmp_path)
    _rewrite(d, lambda t: t.pop("model.layers.1.self_attn.o_proj.q_scale"))
    with pytest.raises(CourseError) as e:
        exl2.open_exl2(d)
    assert "o_proj.q_scale is missing" in _one_line(e)


@pytest.mark.parametrize("edit,words", [
    (lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.q_weight",
                             t["model.layers.0.self_attn.q_proj.q_weight"][:-2]), "packed rows"),
    (lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.q_scale",
                             t["model.layers.0.self_attn.q_proj.q_scale"][:, :-1]), "wrong shape"),
    (lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.q_weight",
                             t["model.layers.0.self_attn.q_proj.q_weight"][:, :-32]), "wrong shape"),
    (lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.q_groups",
                             torch.tensor([7, 0, 2, 6, 2, 10, 2, 14], dtype=torch.int16)), "unsupported bit width 7"),
])
def test_wrong_shapes_and_bits(tmp_path, edit, words):
    d = _copy(tmp_path)
    _rewrite(d, edit)
    with pytest.raises(CourseError) as e:
        exl2.open_exl2(d)
    assert words in _one_line(e)
