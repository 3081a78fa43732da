"""The EXL2 format library against checkpoints made by exllamav2's own converter, plus writer round trips."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from fixture_dirs import EXL2
from safetensors.torch import load_file, save_file

from helpers.core import units
from helpers.core.errors import CourseError
from helpers.format import packing, quantize, reader, tiny, writer
from helpers.format.bits import auto_mix, stored_bits
from helpers.format.names import LINEAR_KINDS
from helpers.recordings import format_check

torch.set_num_threads(2)
NAMES = ["tiny_llama_b3.0", "tiny_llama_b4.5", "tiny_qwen2_b6.5"]


@pytest.fixture(scope="module", params=NAMES)
def fixture(request):
    d = EXL2[request.param]
    return reader.open_exl2(d), load_file(str(d / "exllamav2_truth.safetensors"))


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
        seen |= set(reader.open_exl2(EXL2[n]).bits_histogram())
    assert seen == {2, 3, 4, 5, 6, 8}
    assert 2 in reader.open_exl2(EXL2["tiny_llama_b3.0"]).bits_histogram()


def test_bits_per_weight_is_near_the_converters_target():
    for n in NAMES:
        target = float(n.split("_b")[1])
        ckpt = reader.open_exl2(EXL2[n])
        assert abs(ckpt.bits_per_weight - target) < 0.05, (n, ckpt.bits_per_weight)
        assert ckpt.config["quantization_config"]["bits"] == target


def test_counting_of_one_linear_by_hand():
    ckpt = reader.open_exl2(EXL2["tiny_llama_b3.0"])
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
    ckpt = reader.open_exl2(EXL2["tiny_qwen2_b6.5"])
    bb = ckpt.byte_breakdown()
    assert bb["vram_bytes"] == sum(bb["by_kind"].values())
    assert bb["vram_bytes"] == bb["decoder_linear_bytes"] + bb["head_bytes"] + bb["norm_bytes"]
    assert bb["system_ram_bytes"] == 1024 * 256 * 2  # the embedding, fp16, on the CPU
    assert bb["disk_bytes"] == (EXL2["tiny_qwen2_b6.5"] / "output.safetensors").stat().st_size
    assert bb["by_kind"]["bias"] == 2 * 2 * (256 + 128 + 128)
    assert bb["norm_bytes"] == 2 * (2 * 2 * 256 + 256)
    assert bb["head"] == "exl2"
    assert sum(r["vram_bytes"] for r in ckpt.layer_table()) == bb["decoder_linear_bytes"] + bb["head_bytes"]


def test_layer_table_rows():
    rows = reader.open_exl2(EXL2["tiny_llama_b4.5"]).layer_table()
    assert [r["kind"] for r in rows][:7] == list(LINEAR_KINDS)
    assert [r["name"] for r in rows][:2] == ["model.layers.0.self_attn.q_proj",
                                                 "model.layers.0.self_attn.k_proj"]
    assert rows[-1]["name"] == "lm_head" and rows[-1]["layer"] is None
    for r in rows:
        assert sum(r["bits"].values()) == r["in"]
        assert 2.5 < r["bpw"] < 9


# --------------------------------------------------------------------------------------------------- bad input
def _copy(tmp_path, name="tiny_llama_b3.0"):
    d = tmp_path / name
    shutil.copytree(EXL2[name], d)
    (d / "exllamav2_truth.safetensors").unlink()
    return d


def _one_line(exc_info):
    msg = str(exc_info.value)
    assert "\n" not in msg and len(msg) < 400
    return msg


def test_missing_directory(tmp_path):
    with pytest.raises(CourseError) as e:
        reader.open_exl2(tmp_path / "nope")
    assert "does not exist" in _one_line(e)


def test_missing_config(tmp_path):
    d = _copy(tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(CourseError) as e:
        reader.open_exl2(d)
    assert "config.json" in _one_line(e)


def test_not_an_exl2_checkpoint(tmp_path):
    d = tmp_path / "float"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"hidden_size": 8}))
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(8, 8)}, str(d / "model.safetensors"))
    with pytest.raises(CourseError) as e:
        reader.open_exl2(d)
    assert "not an EXL2 checkpoint" in _one_line(e)
    (d / "model.safetensors").unlink()
    with pytest.raises(CourseError) as e:
        reader.open_exl2(d)
    assert "no *.safetensors" in _one_line(e)


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.0005])
def test_truncated_or_corrupt_file(tmp_path, keep):
    d = _copy(tmp_path)
    f = d / "output.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CourseError) as e:
        reader.open_exl2(d)
    assert "corrupt" in _one_line(e)


def test_garbage_header(tmp_path):
    d = _copy(tmp_path)
    (d / "output.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CourseError) as e:
        reader.open_exl2(d)
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
        reader.open_exl2(d)
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
        reader.open_exl2(d)
    assert words in _one_line(e)


# ------------------------------------------------------------------------------------------------------- writing
def test_packing_is_byte_exact_with_the_converter(fixture):
    ckpt, _ = fixture
    for name, q in ckpt.linears.items():
        stored = q.tensors()
        made = packing.pack_linear(q.codes(), q.scale_codes(), q.scale_max, q.groups, q.invperm, q.bias)
        assert set(made) == set(stored)
        for k in stored:
            assert made[k].dtype == stored[k].dtype and torch.equal(made[k], stored[k]), (name, k)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_unpack_every_width(bits):
    g = torch.Generator().manual_seed(bits)
    for rows in (32, 64, 96):
        codes = torch.randint(0, 2**bits, (rows, 40), generator=g)
        words = packing.pack_columns(codes, bits)
        assert words.shape == (rows * bits // 32, 40) and words.dtype == torch.int32
        assert torch.equal(packing.unpack_columns(words, bits, rows).long(), codes)
    # the layout itself: 4-bit, value i of a column sits at bits 4i..4i+3 of the word, low first
    assert packing.pack_columns(torch.arange(8)[:, None], 4).item() == 0x76543210
    # 3-bit values straddle words: value 10 is bits 30..32
    c = torch.zeros(32, 1, dtype=torch.long)
    c[10] = 0b111
    assert packing.pack_columns(c, 3)[:, 0].tolist() == [-(2**31) + 2**30, 1, 0]


# exllamav2 RTN-like error levels for Gaussian weights in groups of 32 (relative RMS); a broken packer is ~100%
RTN_RMS = {2: 0.5, 3: 0.25, 4: 0.125, 5: 0.063, 6: 0.032, 8: 0.009}


def _roundtrip(tmp_path, weight, spec, **kw):
    n, k = weight.shape
    q = quantize.quantize_linear(weight, spec, **kw)
    d = tmp_path / "one"
    d.mkdir(exist_ok=True)
    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": k, "num_attention_heads": 4, "intermediate_size": n}
    save_file({f"model.layers.0.mlp.up_proj.{s}": v for s, v in q.items()}, str(d / "output.safetensors"))
    (d / "config.json").write_text(json.dumps(cfg))
    ql = reader.open_exl2(d).linears["model.layers.0.mlp.up_proj"]
    return q, ql


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_round_trip_every_width_act_order_and_odd_out_features(tmp_path, bits):
    g = torch.Generator().manual_seed(10 + bits)
    w = torch.randn(200, 256, generator=g) * 0.03  # out_features=200: not a multiple of 32
    w[:, 7] *= 4  # one loud input feature: act-order must put it first
    q, ql = _roundtrip(tmp_path, w, bits, act_order=True)
    assert q["q_weight"].shape[1] == 224 and ql.padded_out_features == 224
    assert ql.perm[0].item() == 7
    assert not torch.equal(ql.invperm, torch.arange(256))
    # the reader's padded columns: code 2^(bits-1), scale code 15, i.e. exact zeros
    assert (ql.codes()[:, 200:] == 2 ** (bits - 1)).all() and (ql.scale_codes()[:, 200:] == 15).all()
    deq = ql.dequantize()
    assert deq.shape == (200, 256)
    assert ql.groups == [(bits, 32)] * 8
    rel = ((deq - w).pow(2).mean() / w.pow(2).mean()).sqrt().item()
    assert rel < RTN_RMS[bits], rel
    # padded columns are zeros after dequantization
    assert (ql.dequantize_stored()[:, 200:] == 0).all()


def test_mixed_groups_and_exllamav2_mix_strings(tmp_path):
    w = torch.randn(96, 512, generator=torch.Generator().manual_seed(3)) * 0.02
    q, ql = _roundtrip(tmp_path, w, "0.1:8b_32g/0.2:6b_64g/0.3:4b_128g/0.4:2b_64g", act_order=False)
    assert ql.groups == [(8, 32), (8, 32), (6, 64), (6, 64), (4, 128), (4, 128), (2, 64)]
    assert q["q_groups"].tolist() == [8, 0, 8, 8, 6, 16, 6, 28, 4, 40, 4, 56, 2, 72]
    assert torch.equal(ql.invperm, torch.arange(512))
    err = (ql.dequantize() - w).abs()
    assert err[:, :64].mean() < err[:, -64:].mean() / 10  # 8-bit rows are far closer than 2-bit rows
    assert ql.mix() == "0.125:8b/0.25:6b/0.5:4b/0.125:2b"


def test_target_bpw_is_hit():
    for target in (2.5, 3.0, 4.25, 5.5, 6.5, 8.0):
        groups = auto_mix(5120, 5120, target)
        bpw = stored_bits(5120, 5120, groups) / 5120**2
        assert abs(bpw - target) < 0.01, (target, bpw)
        assert len({b for b, _ in groups}) <= 2


def _tiny(tmp_path, **kw):
    cfg = tiny.tiny_config(**kw)
    sd = tiny.random_float_state_dict(cfg, seed=1)
    return cfg, sd


def test_write_exl2_round_trip_with_config_and_tokenizer(tmp_path):
    cfg, sd = _tiny(tmp_path, arch="Qwen2ForCausalLM")
    out = writer.write_exl2(tmp_path / "m", cfg, sd, bits=5.0, head_bits=6, progress=False,
                          tokenizer_dir=EXL2["tiny_qwen2_b6.5"])
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "output.safetensors", "tokenizer.json",
                                                     "tokenizer_config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary folder left behind
    written = json.loads((out / "config.json").read_text())
    assert written["rope_theta"] == 100000.0  # top level, although the source nests it (transformers 5)
    assert written["quantization_config"]["quant_method"] == "exl2"
    assert written["quantization_config"]["head_bits"] == 6
    ckpt = reader.open_exl2(out)
    assert abs(ckpt.bits_per_weight - 5.0) < 0.1
    assert written["quantization_config"]["bits"] == pytest.approx(ckpt.bits_per_weight, abs=1e-3)
    assert ckpt.linears["lm_head"].rows_per_bits() == {8: 128, 6: 128}  # exllamav2's 6-bit head: 0.15:8b/0.85:6b
    fsd = ckpt.float_state_dict()
    assert set(fsd) == set(sd)
    for name, t in sd.items():
        err = ((fsd[name] - t).pow(2).mean() / t.pow(2).mean()).sqrt().item()
        assert err < (0.1 if "proj.weight" in name or "lm_head" in name else 1e-3), (name, err)
    assert ckpt.tensor("model.norm.weight").dtype == torch.float16


def test_tied_model_has_no_head(tmp_path):
    cfg, sd = _tiny(tmp_path, tied=True, vocab=1024)
    ckpt = reader.open_exl2(writer.write_exl2(tmp_path / "m", cfg, sd, bits=4, progress=False))
    assert ckpt.tied_head and "lm_head" not in ckpt.linears
    assert "lm_head.weight" not in ckpt.float_state_dict()
    bb = ckpt.byte_breakdown()
    assert bb["by_kind"]["fp16_head"] == 1024 * 256 * 2 == bb["system_ram_bytes"]
    assert ckpt.config["tie_word_embeddings"] is True


def test_write_refuses_bad_input(tmp_path):
    cfg, sd = _tiny(tmp_path)
    with pytest.raises(CourseError, match="unsupported bit width 7"):
        writer.write_exl2(tmp_path / "a", cfg, sd, bits=7, progress=False)
    bad = dict(sd)
    bad["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(256, 128)
    with pytest.raises(CourseError, match="wrong shapes"):
        writer.write_exl2(tmp_path / "b", cfg, bad, bits=4, progress=False)
    with pytest.raises(CourseError, match="tokenizer directory"):
        writer.write_exl2(tmp_path / "c", cfg, sd, bits=4, progress=False, tokenizer_dir=tmp_path / "none")
    keep = tmp_path / "notes"
    keep.mkdir()
    (keep / "mine.txt").write_text("do not delete")
    with pytest.raises(CourseError, match="refusing to replace"):
        writer.write_exl2(keep, cfg, sd, bits=4, progress=False)
    assert (keep / "mine.txt").read_text() == "do not delete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]


def test_full_disk_mid_write_leaves_nothing(tmp_path, monkeypatch):
    import errno

    cfg, sd = _tiny(tmp_path)
    real = writer.write_safetensors

    def full(path, specs, metadata=None):
        path.write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "write_safetensors", full)
    with pytest.raises(CourseError) as e:
        writer.write_exl2(tmp_path / "m", cfg, sd, bits=4, progress=False)
    assert "disk is full" in _one_line(e)
    assert list(tmp_path.iterdir()) == []
    # an existing checkpoint survives a failed rewrite untouched
    monkeypatch.setattr(writer, "write_safetensors", real)
    out = writer.write_exl2(tmp_path / "m", cfg, sd, bits=4, progress=False)
    before = (out / "output.safetensors").read_bytes()
    monkeypatch.setattr(writer, "write_safetensors", full)
    with pytest.raises(CourseError):
        writer.write_exl2(tmp_path / "m", cfg, sd, bits=6, progress=False)
    assert (out / "output.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_sharded_checkpoint_reads_like_one_file(tmp_path):
    cfg, sd = _tiny(tmp_path)
    one = reader.open_exl2(writer.write_exl2(tmp_path / "one", cfg, sd, bits=4, progress=False))
    many = reader.open_exl2(writer.write_exl2(tmp_path / "many", cfg, sd, bits=4, progress=False, shard_bytes=300_000))
    assert len(many.files) > 2 and (many.dir / "model.safetensors.index.json").is_file()
    assert one.tensor_names == many.tensor_names
    for n in one.tensor_names:
        assert torch.equal(one.tensor(n), many.tensor(n)), n


# ------------------------------------------------------------------------------------------------------- inspect
def test_inspect_cli_text_and_json(capsys):
    from helpers.__main__ import main

    d = EXL2["tiny_llama_b3.0"]
    assert main(["inspect", str(d)]) == 0
    text = capsys.readouterr().out
    ckpt = reader.open_exl2(d)
    bb = ckpt.byte_breakdown()
    assert f"bits per weight: {ckpt.bits_per_weight:.3f}" in text
    assert "model.layers.1.mlp.down_proj" in text and "0.0833:6b/0.25:3b/0.667:2b" in text
    assert units.fmt_gib(bb["vram_bytes"], 3, small_in_mib=True) in text \
        and units.fmt_gib(bb["system_ram_bytes"], 3, small_in_mib=True) in text
    assert "2-bit" in text
    assert main(["inspect", str(d), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["layers"] == json.loads(json.dumps(ckpt.layer_table()))
    assert doc["totals"]["bytes"]["vram_bytes"] == bb["vram_bytes"]
    assert sum(doc["totals"]["bits_share"].values()) == pytest.approx(1, abs=1e-3)
    assert main(["inspect", str(d / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_gpu_recording_is_registered_and_refuses_without_cuda():
    assert set(format_check.GPU_RECORDINGS) == {"exl2-exllamav2-check"}
    if not torch.cuda.is_available():
        with pytest.raises(CourseError, match="CUDA"):
            format_check.GPU_RECORDINGS["exl2-exllamav2-check"]()
