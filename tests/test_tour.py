"""Notebook 02's helpers: inspect's numbers reach the notebook unchanged, one tensor decoded by hand matches the
library and exllamav2's own dequantization, loading/chat/agreement on a tiny fixture, the reader's-own-model path."""
from __future__ import annotations

import io
import json
import shutil
from contextlib import redirect_stdout

import pytest
import torch
from fixture_dirs import EXL2

from helpers import plots
from helpers.__main__ import main as cli
from helpers.core.errors import CourseError
from helpers.engines import agreement as A
from helpers.engines import backend as B
from helpers.format import bits as exl2_bits
from helpers.format import names as exl2_names
from helpers.format import packing as exl2_packing
from helpers.format import tiny as exl2_tiny
from helpers.lessons import tour
from helpers.memory.kv_cache import kv_cache_bytes
from helpers.memory.setup import LoadSetup
from helpers.specs.shapes import model_shape

LLAMA3 = EXL2["tiny_llama_b3.0"]      # exllamav2's converter at 3.0 bpw: 2, 3, 4, 6 and 8-bit groups
LLAMA45 = EXL2["tiny_llama_b4.5"]
QWEN = EXL2["tiny_qwen2_b6.5"]

torch.set_num_threads(2)


def _cli_stdout(*argv: str) -> str:
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert cli(list(argv)) == 0
    return buf.getvalue()


# --- 1. inside the file: the notebook's numbers are inspect's numbers ---------------------------------------------
@pytest.mark.parametrize("folder", [LLAMA3, QWEN], ids=lambda p: p.name)
def test_inspect_report_equals_the_cli_json(folder):
    ckpt = tour.open_model(folder)
    ours = json.loads(json.dumps(tour.inspect_report(ckpt)))
    theirs = json.loads(_cli_stdout("inspect", str(folder), "--json"))
    assert ours == theirs
    cli_totals = _cli_stdout("inspect", str(folder), "--totals").rstrip("\n")
    assert tour.inspect_totals_text(ckpt) == cli_totals.replace(str(ckpt.dir), ckpt.dir.name)
    totals = tour.inspect_totals_text(ckpt)
    assert ckpt.dir.name in totals and str(ckpt.dir.parent) not in totals


def test_the_embedded_model_report_equals_the_cli_json():
    from helpers.models.embedded import embedded_model_dir

    folder = embedded_model_dir(build=False)
    ours = json.loads(json.dumps(tour.inspect_report(tour.open_model(folder))))
    assert ours == json.loads(_cli_stdout("inspect", str(folder), "--json"))


def test_the_charts_draw_inspects_numbers():
    ckpt = tour.open_model(LLAMA3)
    report = json.loads(_cli_stdout("inspect", str(LLAMA3), "--json"))
    fig = plots.plot_layer_bpw(tour.inspect_report(ckpt)["layers"])
    drawn = {line.get_label(): list(zip(line.get_xdata(), line.get_ydata())) for line in fig.axes[0].lines
             if not line.get_label().startswith("_")}
    want: dict[str, list] = {}
    for r in report["layers"]:
        if r["kind"] != "lm_head":
            want.setdefault(r["kind"], []).append((r["layer"], r["bpw"]))
    assert drawn == want
    head = [r for r in report["layers"] if r["kind"] == "lm_head"][0]
    assert [ln.get_ydata()[0] for ln in fig.axes[0].lines if ln.get_label().startswith("_")] == [head["bpw"]]

    fig = plots.plot_bytes_where(tour.inspect_report(ckpt)["totals"])
    b = report["totals"]["bytes"]
    heights: dict[float, float] = {}
    for p in fig.axes[0].patches:
        heights[round(p.get_x() + p.get_width() / 2)] = heights.get(round(p.get_x() + p.get_width() / 2), 0) \
            + p.get_height()
    assert heights[0] == pytest.approx(b["disk_bytes"] / 2**30, rel=1e-12)
    assert heights[1] == pytest.approx(b["vram_bytes"] / 2**30, rel=1e-12)
    assert heights[2] == pytest.approx(b["system_ram_bytes"] / 2**30, rel=1e-12)
    assert sum(n for _, n in tour.vram_parts(report["totals"])) == b["vram_bytes"]


def test_tensor_inventory_counts_every_stored_byte():
    ckpt = tour.open_model(LLAMA3)
    inv = {r["tensor"]: r for r in tour.tensor_inventory(ckpt)}
    n = len(ckpt.linears)
    assert n == 2 * 7 + 1
    for s in exl2_names.Q_SUFFIXES:
        assert inv[s]["count"] == n
    assert inv["q_weight"]["dtype"] == "int32" and inv["q_groups"]["dtype"] == "int16"
    assert inv["embed_tokens.weight"]["count"] == 1 and inv["*norm.weight"]["count"] == 2 * 2 + 1
    assert sum(r["bytes"] for r in inv.values()) == sum(ckpt.tensor_nbytes(t) for t in ckpt.tensor_names)
    one = tour.linear_tensors(ckpt, "model.layers.0.mlp.down_proj")
    assert [r["name"].rsplit(".", 1)[1] for r in one] == list(exl2_names.Q_SUFFIXES)
    assert one[-1]["shape"] == [768] and one[0]["shape"][1] == 256
    with pytest.raises(CourseError, match="no quantized linear"):
        tour.linear_tensors(ckpt, "model.layers.9.self_attn.q_proj")


def test_group_table_decodes_q_groups():
    ckpt = tour.open_model(LLAMA3)
    for name, q in ckpt.linears.items():
        rows = tour.group_table(ckpt, name)
        assert [(r["bits"], r["rows"]) for r in rows] == q.groups
        assert sum(r["rows"] for r in rows) == q.in_features
        assert sum(r["packed_rows"] for r in rows) == ckpt.tensor_shape(f"{name}.q_weight")[0]
        assert all(r["packed_rows"] == exl2_bits.packed_rows(r["rows"], r["bits"]) for r in rows)
        assert [r["first_row"] for r in rows] == [sum(x["rows"] for x in rows[:i]) for i in range(len(rows))]


@pytest.mark.parametrize("bits", exl2_bits.BIT_WIDTHS)
def test_hand_unpack_reads_the_packed_bit_stream(bits):
    codes = torch.randint(0, 2**bits, (32, 3), generator=torch.Generator().manual_seed(bits), dtype=torch.int64)
    words = exl2_packing.pack_columns(codes, bits)
    for col in range(3):
        assert tour.hand_unpack(words[:, col].tolist(), bits, 32) == codes[:, col].tolist()


def test_walkthrough_agrees_with_the_library_and_with_exllamav2():
    """Each first group's bit width (8, 6, 4, 3 and 2 occur in this fixture), decoded by hand, equals
    helpers.format.reader's decoder, and the weights placed by q_invperm equal exllamav2's own
    get_weight_tensor_dq() within fp16 rounding."""
    from safetensors.torch import load_file

    ckpt = tour.open_model(LLAMA3)
    truth = load_file(str(LLAMA3 / "exllamav2_truth.safetensors"))
    seen = set()
    for name in ckpt.linears:
        if name.endswith(("gate_proj", "up_proj", "down_proj")):
            continue  # exllamav2's runtime order differs from the file's for the MLP (tests/fixtures/exl2/README.md)
        for column in (0, 13):
            w = tour.decode_walkthrough(ckpt, name, column=column, n_values=7)
            assert w["agrees"], name
            assert w["codes"] == w["codes_lib"] and len(w["codes"]) == 7
            assert w["scale_code"] == w["scale_codes"][column % 8]
            assert w["scale_by_hand"] == w["scale_lib"] and w["scale_exact"] == pytest.approx(w["scale_lib"], rel=0.02)
            theirs = truth[f"{name}.weight_dq_t"].float()[w["stored_rows_to_inputs"], column].tolist()
            top = truth[f"{name}.weight_dq_t"].float().abs().max().item()
            assert max(abs(a - b) for a, b in zip(w["weights_in_logical_matrix"], theirs)) <= 0.01 * top, name
            seen.add(w["bits"])
    assert {8, 4, 3}.issubset(seen)
    text = tour.format_walkthrough(tour.decode_walkthrough(ckpt, "model.layers.0.self_attn.q_proj"))
    assert "hand decoding agrees with helpers.format.reader: True" in text and "low nibble first" in text


def test_walkthrough_catches_a_wrong_decoder(monkeypatch):
    ckpt = tour.open_model(LLAMA45)
    monkeypatch.setattr(tour, "hand_unpack", lambda words, bits, count: [0] * count)
    assert tour.decode_walkthrough(ckpt, "model.layers.1.self_attn.k_proj")["agrees"] is False


# --- 2. loading, memory, chat ---------------------------------------------------------------------------------------
def test_load_with_memory_reads_before_and_after_and_the_cache_it_predicts():
    loaded = tour.load_with_memory(QWEN, max_seq_len=256, cache_mode="fp16", backend="reference")
    be = loaded.backend
    assert be.name == "reference" and be.max_seq_len == 256
    assert loaded.before["process_rss_bytes"] > 0 and loaded.after["process_rss_bytes"] > 0
    assert loaded.predicted_cache_bytes == kv_cache_bytes(model_shape(str(QWEN)), 256, "fp16")
    # 2 layers x K and V x 256 tokens x 2 KV heads x 64: fp16 in exllamav2 (plus its fp16 temp layer for Q modes only)
    assert loaded.predicted_cache_bytes == 2 * 2 * 256 * 2 * 64 * 2
    assert be.cache_bytes() == 2 * loaded.predicted_cache_bytes      # float32 on the CPU
    text = loaded.format()
    assert "process RSS (system RAM)" in text and "max_seq_len 256, cache mode fp16" in text
    with pytest.raises(CourseError, match="quantized caches need exllamav2"):
        tour.load_with_memory(QWEN, max_seq_len=256, cache_mode="q4", backend="reference")


@pytest.mark.filterwarnings("ignore::helpers.core.errors.CourseWarning")   # the fixture has no chat template
def test_chat_streams_each_answer():
    be = B.load(LLAMA45, max_seq_len=128, backend="reference")
    out: list[str] = []
    answers = tour.chat(be, ["hi", "bye"], max_new_tokens=4, out=out.append)
    text = "".join(out)
    assert len(answers) == 2 and text.startswith("user: hi\nassistant: ")
    assert f"assistant: {answers[0]}\nuser: bye\nassistant: {answers[1]}\n" in text
    assert answers[0] == be.generate("hi", max_new_tokens=4, chat=True)


# --- 3. agreement ---------------------------------------------------------------------------------------------------
def test_agreement_without_a_recording_says_how_to_make_one(tmp_path):
    be = B.load(QWEN, max_seq_len=64, backend="reference")
    a = tour.agreement(be, results_dir=tmp_path)
    assert a == {"mode": "none", "message": tour.NOT_RECORDED}
    assert tour.format_agreement(a) == "not recorded yet: run `make gpu-results` on a CUDA machine"


def test_agreement_shows_a_recording_with_its_label_and_a_live_check(tmp_path):
    be = B.load(QWEN, max_seq_len=64, backend="reference")
    other = B.load(QWEN, max_seq_len=64, backend="reference")
    rows, extra, tensors = A.measure_agreement(other, be, prompt="hello there", chat=False, steps=3)
    A.save_agreement("exllamav2-vs-reference-Fake GPU", rows, extra, tensors,
                     prov={"device": "cuda", "gpu": "Fake GPU", "date": "2026-01-02T00:00:00", "torch": "2.x"},
                     results_dir=tmp_path)
    a = tour.agreement(be, results_dir=tmp_path)
    assert a["mode"] == "recorded" and a["label"].startswith("recorded on Fake GPU, 2026-01-02")
    assert a["rows"] == rows and a["live_vs_recorded"]["same_next_token"]
    text = tour.format_agreement(a)
    assert text.splitlines()[0] == f"exllamav2 vs reference, {a['label']}"
    assert "relative L2 error 0.00e+00" in text and "same next token: True" in text


def test_agreement_on_exllamav2_runs_both_engines_live(monkeypatch):
    """The GPU branch, with the engines faked: the reference is loaded on CUDA in float32 and compared live."""
    calls = {}
    ref = B.load(QWEN, max_seq_len=64, backend="reference")

    class FakeExl:
        name, device, max_seq_len, model_dir = "exllamav2", "cuda", 2048, QWEN

    def fake_load(model_dir, **kw):
        calls["load"] = kw
        return ref

    def fake_measure(exl, r, *, prompt, steps):
        calls["measure"] = (exl, r, prompt, steps)
        return [{"step": 0}], {"engines": ["exllamav2 on cuda", "reference on cuda"], "prompt_tokens": 9,
                               "prompt_logits_max_abs_diff": 0.02, "prompt_logits_rel_l2": 1e-3,
                               "first_different_token": None, "first_near_tie": None,
                               "agree_until_first_near_tie": True}, {}

    monkeypatch.setattr(B, "load", fake_load)
    monkeypatch.setattr(A, "measure_agreement", fake_measure)
    a = tour.agreement(FakeExl(), steps=5)
    assert calls["load"] == {"max_seq_len": 1024, "backend": "reference", "device": "cuda", "dtype": torch.float32}
    assert calls["measure"][1:] == (ref, tour.PROMPT, 5) and a["mode"] == "live"
    assert tour.format_agreement(a).startswith("exllamav2 on cuda vs reference on cuda, live on this machine")


def test_reference_vs_transformers_on_a_float_checkpoint(tmp_path):
    from safetensors.torch import save_file

    cfg = exl2_tiny.tiny_config(vocab=1024, layers=2)
    cfg["rope_theta"] = 100000.0
    save_file({k: v.contiguous() for k, v in exl2_tiny.random_float_state_dict(cfg, seed=1).items()},
              str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(LLAMA45 / f, tmp_path / f)
    with pytest.warns(Warning):   # the fixture tokenizer has no chat template: plain prompt
        r = tour.reference_vs_transformers(tmp_path, prompt="the reference and transformers")
    assert r["rel_l2"] < 1e-5 and r["same_top5"] and r["same_argmax_every_position"]
    text = tour.format_reference_vs_transformers(r)
    assert "relative L2 error below 0.0001: True" in text and "same top-5 next tokens: True" in text


# --- 4. quantization cost -------------------------------------------------------------------------------------------
def test_quantization_cost_asks_quality_for_the_notebooks_bounded_sweep(monkeypatch):
    import helpers.lessons.quality as Q

    seen = {}
    monkeypatch.setattr(Q, "quality_sweep", lambda bits, *, max_tokens: seen.update(bits=bits, tokens=max_tokens) or [])
    tour.quantization_cost()
    assert seen == {"bits": (3, 4, 5, 6, 8), "tokens": 256}
    rows = [{"label": "float", "bits": None, "bpw": 32.0, "weights_bytes": 2**30, "perplexity": 10.0,
             "ppl_vs_float": 1.0},
            {"label": "EXL2 4 bpw", "bits": 4.0, "bpw": 4.0123, "weights_bytes": 2**28, "perplexity": 12.346,
             "ppl_vs_float": 1.2345}]
    t = tour.cost_table(rows)
    assert list(t.columns) == ["bpw", "GiB", "perplexity", "vs float"] and list(t.index) == ["float", "EXL2 4 bpw"]
    assert t.loc["float"].tolist() == [32.0, 1.0, 10.0, 1.0]
    assert t.loc["EXL2 4 bpw"].tolist() == [4.01, 0.25, 12.35, 1.23]
    fig = plots.plot_quantization_cost(rows)
    x, y = fig.axes[0].lines[0].get_data()
    assert list(x) == [0.25] and list(y) == [12.346]


# --- 5. the reader's own model --------------------------------------------------------------------------------------
def test_own_model_from_the_environment_or_the_embedded_one(monkeypatch):
    import helpers.models.embedded as M

    monkeypatch.setattr(M, "embedded_model_dir", lambda *a, **k: LLAMA45)
    monkeypatch.delenv("EXL2_COURSE_MODEL", raising=False)
    folder, note = tour.own_model()
    assert folder == LLAMA45 and note.startswith("EXL2_COURSE_MODEL is not set: using the embedded model.")
    assert "\n" not in note
    monkeypatch.setenv("EXL2_COURSE_MODEL", str(QWEN))
    assert tour.own_model() == (QWEN.resolve(), f"EXL2_COURSE_MODEL={QWEN.resolve()}: using your model")
    monkeypatch.setenv("EXL2_COURSE_MODEL", str(QWEN / "nowhere"))
    folder, note = tour.own_model()
    assert folder == LLAMA45 and "is not a folder" in note and note.endswith("(using the embedded model for now)")


def test_fits_here_refuses_a_model_too_big_for_the_cpu_reference(monkeypatch):
    import psutil

    ckpt = tour.open_model(QWEN)
    assert tour.fits_here(ckpt, "cpu") == (True, "")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("VM", (), {"available": 1000})())
    ok, why = tour.fits_here(ckpt, "cpu")
    assert not ok and why.startswith("too big for the CPU reference here")
    assert tour.fits_here(ckpt, "cuda") == (True, "")


# --- the figures of notebooks 01 and 02: titles, no overlapping labels, no doubled legend ---------------------------
def test_quantization_cost_legend_is_not_doubled_and_neighbour_labels_alternate():
    rows = [{"label": "float (dequantized GGUF)", "bits": None, "bpw": 32.0, "weights_bytes": 2**29,
             "perplexity": 27.2, "ppl_vs_float": 1.0}]
    rows += [{"label": f"EXL2 {b} bpw", "bits": float(b), "bpw": b - 0.01, "weights_bytes": 2**23 * b,
              "perplexity": 27.7, "ppl_vs_float": 1.02} for b in (6, 8)]
    ax = plots.plot_quantization_cost(rows).axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "float source (float32 file)" in legend and not any(") (" in t for t in legend)
    offsets = [a.xyann for a in ax.texts]           # 5.99 and 8.01 bpw: one label above, one below
    assert len(offsets) == 2 and offsets[0][1] > 0 > offsets[1][1]
    assert ax.get_title()


def test_kv_cache_plot_is_linear_with_separated_end_labels():
    ax = plots.plot_kv_cache_vs_context(["qwen2.5-7b", "qwen2.5-14b"], modes=("fp16", "q4")).axes[0]
    assert ax.get_xscale() == "linear" and ax.get_yscale() == "linear" and "linear" in ax.get_title()
    ys = sorted(a.xyann[1] for a in ax.texts)
    gap = (ax.get_ylim()[1] - ax.get_ylim()[0]) * 0.04
    assert len(ys) == 4 and all(b - a >= gap for a, b in zip(ys, ys[1:]))   # 14b q4 and 7b fp16 nearly coincide
    assert any("qwen2.5-14b q4: 58 KiB/token" in a.get_text() for a in ax.texts)


def test_total_vs_context_marks_and_explains_its_bend():
    ax = plots.plot_total_vs_context(LoadSetup("qwen2.5-14b", bpw=5.5, gpus="RTX 4080 Super")).axes[0]
    assert any(list(line.get_xdata()) == [2048, 2048] for line in ax.lines)
    assert any("bend at 2,048 tokens" in t.get_text() and "max_attention_size" in t.get_text() for t in ax.texts)


def test_every_figure_of_notebooks_01_and_02_has_a_title():
    from helpers.memory.breakdown import breakdown

    bd = breakdown(LoadSetup("qwen2.5-14b", bpw=5.5, max_seq_len=4096, cache_mode="fp16"))
    figs = [plots.plot_breakdown({"4k": bd}, gpu_gib=16), plots.plot_gqa("qwen2.5-14b"),
            plots.plot_gqa("qwen2.5-14b", flash_attn=True),
            plots.plot_calculator_error([{"case": "a", "exllamav2_gib": 1.0, "simple_gib": 0.8}]),
            plots.plot_predicted_vs_measured([])]
    for fig in figs:
        assert all(ax.get_title() for ax in fig.axes), fig
