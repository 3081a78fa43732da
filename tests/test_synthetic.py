"""Synthetic EXL2 checkpoints: exact shapes, the target bits per weight, finite small weights, same seed same bytes."""
from __future__ import annotations

import json

import pytest
import torch

from helpers.cli import synth as synth_cli
from helpers.core import paths
from helpers.core.errors import CourseError
from helpers.format import config, reader, synthetic

torch.set_num_threads(2)


def small_qwen(layers=2):
    cfg = config.resolve_config("qwen2.5-14b")
    cfg.update(num_hidden_layers=layers, hidden_size=512, num_attention_heads=8, num_key_value_heads=2,
               intermediate_size=1408, vocab_size=1000)
    return cfg


def test_shapes_bits_and_scales(tmp_path):
    cfg = small_qwen()
    out = synthetic.write_synthetic(cfg, 5.5, tmp_path / "s", progress=False)
    ckpt = reader.open_exl2(out)  # validates every linear's shape against the config
    assert abs(ckpt.bits_per_weight - 5.5) < 0.05
    assert ckpt.config["rope_theta"] == 1000000.0 and ckpt.config["quantization_config"]["synthetic"] is True
    assert len(ckpt.linears) == 2 * 7 + 1
    head = ckpt.linears["lm_head"]
    assert head.out_features == 1000 and head.padded_out_features == 1024
    assert set(head.rows_per_bits()) == {8, 6}
    assert "model.layers.1.self_attn.v_proj.bias" in ckpt.tensor_names  # Qwen2 has q/k/v biases
    mixes = {r["mix"] for r in ckpt.layer_table()}
    assert len(mixes) > 3  # layers differ, as exllamav2's optimizer makes them
    assert all(len(r["bits"]) <= 2 for r in ckpt.layer_table())
    for q in ckpt.linears.values():
        w = q.dequantize()
        assert torch.isfinite(w.half()).all()
        std = w.std().item() * q.in_features**0.5
        assert 0.3 < std < 0.8, (q.name, std)  # ~0.5/sqrt(in): activations keep their size
    emb = ckpt.tensor("model.embed_tokens.weight")
    assert emb.shape == (1000, 512) and emb.dtype == torch.float16 and torch.isfinite(emb).all()
    assert emb.abs().max() < 0.13


def test_same_seed_same_bytes_and_shards(tmp_path):
    cfg = small_qwen()
    a = synthetic.write_synthetic(cfg, 4.0, tmp_path / "a", seed=3, progress=False)
    b = synthetic.write_synthetic(cfg, 4.0, tmp_path / "b", seed=3, progress=False, shard_bytes=1 << 20, threads=1)
    c = synthetic.write_synthetic(cfg, 4.0, tmp_path / "c", seed=4, progress=False)
    ca, cb, cc = reader.open_exl2(a), reader.open_exl2(b), reader.open_exl2(c)
    assert len(cb.files) > 1 and len(ca.files) == 1
    for n in ca.tensor_names:
        assert torch.equal(ca.tensor(n), cb.tensor(n)), n
    assert not torch.equal(ca.tensor("lm_head.q_weight"), cc.tensor("lm_head.q_weight"))


def test_tied_config_and_bundled_name(tmp_path, monkeypatch):
    cfg = config.resolve_config("smollm2-135m")
    assert cfg["tie_word_embeddings"] is True
    cfg["num_hidden_layers"] = 2
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "mini.json").write_text(json.dumps(cfg))
    monkeypatch.setattr(paths, "CONFIGS_DIR", tmp_path / "cfgs")
    out = synthetic.write_synthetic("mini", 3.0, tmp_path / "m", progress=False)
    ckpt = reader.open_exl2(out)
    assert ckpt.tied_head and "lm_head" not in ckpt.linears
    assert abs(ckpt.bits_per_weight - 3.0) < 0.06
    with pytest.raises(CourseError, match="bundled names \\(mini\\)"):
        config.resolve_config("nonesuch")


def test_bad_input(tmp_path):
    with pytest.raises(CourseError, match="out of range"):
        synthetic.write_synthetic(small_qwen(), 12, tmp_path / "x", progress=False)
    with pytest.raises(CourseError, match="not a decoder config"):
        synthetic.write_synthetic({"num_hidden_layers": 2}, 4.0, tmp_path / "x", progress=False)
    with pytest.raises(CourseError, match="head_bits"):
        synthetic.write_synthetic(small_qwen(), 4.0, tmp_path / "x", progress=False, head_bits=7)
    assert list(tmp_path.iterdir()) == []


def test_cli(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(small_qwen(1)))
    assert synth_cli.main(["--model", str(tmp_path / "config.json"), "--bpw", "4.5", "--out", str(tmp_path / "o"),
                           "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "bpw (decoder, head excluded)" in out and str(tmp_path / "o") in out
