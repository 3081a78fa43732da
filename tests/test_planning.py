"""helpers.planning: the planner's decode estimate and advice, several GPUs, every known card, the JSON schema, the
widget; and the rough edges of `plan` (token counts, bpw range, 256-token pages, GPU names)."""
from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
from fixture_dirs import EXL2

from helpers.core.errors import CourseError, CourseWarning
from helpers.core.units import parse_token_list, parse_tokens
from helpers.format.bits import BPW_RANGE, check_bpw
from helpers.memory.cache_modes import LOAD_AUTOSPLIT_RESERVE_BYTES
from helpers.memory.setup import LoadSetup
from helpers.planning.multi import plan_multi
from helpers.planning.multi_advice import replan
from helpers.planning.planner import SCHEMA_VERSION, plan, trained_positions
from helpers.planning.schema import SCHEMA_PATH, load_schema, validate
from helpers.planning.table import all_gpus
from helpers.specs.gpus import GPUS, gpu_label, gpu_spec
from helpers.specs.shapes import bundled_models, model_shape

SEED = dict(bpw=5.5, max_seq_len=32768, cache_mode="fp16")


def quiet(fn, model, gpus, **kw):
    """``fn`` (plan or plan_multi) of the LoadSetup of ``model`` on ``gpus`` and the settings in ``kw``; depth and
    the split stay arguments of ``fn``. Warnings silenced."""
    args = {k: kw.pop(k) for k in ("depth", "split", "split_mode") if k in kw}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(LoadSetup(model, gpus=gpus, **kw), **args)


def cli(capsys, *argv):
    from helpers.__main__ import main

    rc = main(["plan", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


# --- issue 16 item 5: the decode estimate at a depth, and advice that weighs it --------------------------------

@pytest.mark.parametrize("fmt", ["text", "json"])
def test_must_show_flash_attn_raises_the_estimate(capsys, fmt):
    base = ["--model", "qwen2.5-14b", "--bpw", "5.5", "--ctx", "32768", "--cache", "fp16", "--gpu", "RTX 4080 Super",
            "--depth", "30000"] + (["--json"] if fmt == "json" else [])
    speeds = {}
    for flag in ("--flash-attn", "--no-flash-attn"):
        rc, out, _ = cli(capsys, *base, flag)
        assert rc == 0
        if fmt == "json":
            doc = json.loads(out)
            assert doc["decode_estimate"]["label"] == "estimate" and doc["decode_estimate"]["depth"] == 30000
            assert doc["bytes_per_position"]["total"] > 0
            speeds[flag] = doc["decode_estimate_tok_s"]
        else:
            m = re.search(r"decode \(estimate; fp16 cache, .*?\| 30,000 deep: ([\d.]+) \(", out)
            assert m, out
            speeds[flag] = float(m.group(1))
    assert speeds["--flash-attn"] > 2 * speeds["--no-flash-attn"]


def test_bytes_per_position_follow_the_attention_path():
    slow = quiet(plan, "qwen2.5-14b", "RTX 4080 Super", depth=30000, flash_attn=False, **SEED)
    fast = quiet(plan, "qwen2.5-14b", "RTX 4080 Super", depth=30000, flash_attn=True, **SEED)
    # FP16 cache: 48 layers x (K+V, 8 KV heads x 128 x 2 B) read; repeat_kv adds 40-head copies written and read
    assert fast.position_bytes_dict()["total"] == 48 * 2 * 8 * 128 * 2
    assert slow.position_bytes_dict()["total"] == 48 * (2 * 8 * 128 * 2 + 2 * 2 * 40 * 128 * 2)
    lo, hi = slow.decode.tok_s_low, slow.decode.tok_s_high
    assert lo <= slow.decode.tok_s <= hi and slow.decode.label == "estimate"
    assert slow.decode.tok_s < slow.decode_roofline_tok_s["empty_cache"]


def test_advice_weighs_speed_at_depth_and_prefers_q8():
    p = quiet(plan, "qwen2.5-14b", "RTX 4080 Super", depth=30000, **SEED)
    assert p.decode_by_cache_mode["q4"] < p.decode_by_cache_mode["fp16"]  # dequantized every token: slower
    # without flash-attn the repeat_kv copy of one layer (0.625 GiB at 32k) leaves Q8 short: Q6 keeps the length
    assert "q6 keeps 32,768 tokens" in p.recommendation and "prefer the better quality of q6" in p.recommendation
    fa = quiet(plan, "qwen2.5-14b", "RTX 4080 Super", depth=30000, flash_attn=True, **SEED)
    assert "q8 keeps 32,768 tokens" in fa.recommendation and "prefer the better quality of q8" in fa.recommendation
    q4 = quiet(plan, "qwen2.5-14b", "RTX 4090", bpw=5.5, max_seq_len=32768, cache_mode="q4", depth=30000)
    assert "a quantized cache buys length, not speed" in q4.recommendation


@pytest.mark.parametrize("case", [("qwen2.5-14b", "RTX 4080 Super", 5.5, 32768, "fp16"),
                                  ("qwen2.5-14b", "RTX 4080 Super", 5.5, 23296, "fp16"),
                                  ("llama-3.1-8b", "RTX 3060 12GB", 6.0, 65536, "fp16"),
                                  ("qwen2.5-32b", "RTX 4090", 4.0, 32768, "q8")])
def test_advice_never_names_a_context_its_own_check_calls_tight(case):
    model, gpu, bpw, ctx, mode = case
    p = quiet(plan, model, gpu, bpw=bpw, max_seq_len=ctx, cache_mode=mode)
    named = [int(n.replace(",", "")) for n in re.findall(r"(?:max_seq_len to|up to|is|Use max_seq_len) ([\d,]+) tokens",
                                                          p.recommendation)]
    assert named, p.recommendation
    for n in named:
        for m in ("fp16", "q8", "q6", "q4"):
            if f"{n:,}" == f"{p.longest_safe_context[m]:,}":
                q = quiet(plan, model, gpu, bpw=bpw, max_seq_len=n, cache_mode=m)
                assert q.margin_bytes >= LOAD_AUTOSPLIT_RESERVE_BYTES and "Tight" not in q.recommendation


def test_trained_positions_read_rope_scaling_from_config():
    assert trained_positions(model_shape("qwen2.5-14b")) == 32768
    assert trained_positions(model_shape("llama-3.3-70b")) == 131072
    cfg = json.loads((Path(__file__).parents[1] / "helpers/specs/configs/qwen2.5-14b.json").read_text())
    cfg["rope_scaling"] = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert trained_positions(model_shape(cfg)) == 131072
    with pytest.warns(CourseWarning, match="beyond the 32,768 positions .*no rope_scaling"):
        p = plan(LoadSetup("qwen2.5-14b", gpus="H100 80GB SXM", bpw=5.5, max_seq_len=65536))
    assert "32,768" in p.recommendation
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan(LoadSetup(cfg, gpus="H100 80GB SXM", bpw=5.5, max_seq_len=65536))  # YaRN x4: no warning


# --- issue 17 item 6: plan's rough edges ----------------------------------------------------------------------

def test_one_token_parser_for_every_context(capsys):
    assert parse_tokens("32k") == parse_tokens("32768") == parse_tokens(" 32_768 ") == 32768
    assert parse_token_list("4k,32k") == [4096, 32768]
    with pytest.raises(CourseError, match="not a whole number of tokens"):
        parse_tokens("32q")
    rc, a, _ = cli(capsys, "--model", "qwen2.5-14b", "--bpw", "5.5", "--ctx", "32k", "--gpu-gib", "16", "--json")
    rc2, b, _ = cli(capsys, "--model", "qwen2.5-14b", "--bpw", "5.5", "--ctx", "32768", "--gpu-gib", "16", "--json")
    assert rc == rc2 == 0 and json.loads(a) == json.loads(b)
    rc, _, err = cli(capsys, "--model", "qwen2.5-14b", "--bpw", "5.5", "--ctx", "32q", "--gpu-gib", "16")
    assert rc == 2 and err.count("\n") == 1 and "32k" in err
    from helpers.cli import bench, emulate, generate  # the others read --ctx with the same parser
    for mod in (bench, emulate, generate):
        assert "parse_token" in Path(mod.__file__).read_text()


def test_one_bpw_range_for_plan_and_synth(tmp_path):
    from helpers.format.synthetic import write_synthetic

    assert BPW_RANGE == (2.0, 8.0) and check_bpw(2.0) == 2.0 and check_bpw(8.0) == 8.0
    for bad in (1.95, 8.05):
        with pytest.raises(CourseError, match="2.0 to 8.0") as e1:
            plan(LoadSetup("qwen2.5-7b", gpus=16, bpw=bad, max_seq_len=4096))
        with pytest.raises(CourseError, match="2.0 to 8.0") as e2:
            write_synthetic("smollm2-135m", bad, tmp_path / "x", progress=False)
        assert str(e1.value) == str(e2.value)


def test_context_off_the_256_page_gets_a_note(capsys):
    p = quiet(plan, "qwen2.5-7b", "RTX 4090", bpw=5.0, max_seq_len=30000)
    assert any("not a multiple of 256" in n and "29,952 or 30,208" in n for n in p.notes)
    assert not quiet(plan, "qwen2.5-7b", "RTX 4090", bpw=5.0, max_seq_len=30208).notes
    _, out, _ = cli(capsys, "--model", "qwen2.5-7b", "--bpw", "5", "--ctx", "30000", "--gpu", "RTX 4090")
    assert "note: max_seq_len 30,000 is not a multiple of 256" in out


def test_gpu_given_as_memory_reads_well(capsys):
    assert gpu_label(gpu_spec(16)) == "a GPU with 16 GiB"
    assert gpu_label(gpu_spec("RTX 4080 Super")) == "RTX 4080 Super (16 GiB, 736 GB/s)"
    _, out, _ = cli(capsys, "--model", "qwen2.5-14b", "--bpw", "5.5", "--ctx", "4k", "--gpu-gib", "16")
    assert "GPU: a GPU with 16 GiB -> FITS" in out and "GiB GPU, 16 GiB" not in out


def test_gpu_typo_is_one_line_with_close_matches():
    with pytest.raises(CourseError) as e:
        gpu_spec("RTX 4080 Suprr")
    msg = str(e.value)
    assert "\n" not in msg and "Did you mean" in msg and "'RTX 4080 Super'" in msg


def test_gpu_typo_in_a_notebook_is_one_line(capsys):
    shell_mod = pytest.importorskip("IPython.core.interactiveshell")
    shell = shell_mod.InteractiveShell.instance()
    shell.run_cell("from helpers.core.errors import one_line_errors; one_line_errors()")
    shell.run_cell("from helpers.specs.gpus import gpu_spec; gpu_spec('RTX 4080 Suprr')")
    out = capsys.readouterr()
    text = (out.out + out.err).strip().splitlines()
    assert text[-1].startswith("error: unknown GPU 'RTX 4080 Suprr'. Did you mean 'RTX 4080 Super'")
    assert not any("Traceback" in line for line in text)


# --- issue 17 item 5: the cards people own ---------------------------------------------------------------------

def test_gpu_list_covers_the_cards_people_own_with_sources():
    wanted = ["RTX 2080", "RTX 2080 Ti", "RTX 3060 12GB", "RTX 3070", "RTX 3080", "RTX 3080 Ti", "RTX 3090",
              "RTX 4060 Ti 16GB", "RTX 4070", "RTX 4070 Super", "RTX 4070 Ti Super", "RTX 4080", "RTX 4080 Super",
              "RTX 4090", "RTX 5070 Ti", "RTX 5080", "RTX 5090", "RTX A4000", "RTX A5000", "RTX A6000", "L40S",
              "A100 80GB SXM", "H100 80GB SXM", "H200"]
    assert not [n for n in wanted if n not in GPUS]
    for name, g in GPUS.items():
        assert "nvidia.com" in g["_source"] and g["_checked"], name
        assert g["vram_gib"] > 0 and g["bandwidth_gbs"] > 0 and g["pcie_gen"] in (3, 4, 5), name
    assert gpu_spec("rtx 3080 ti")["name"] == "RTX 3080 Ti" and gpu_spec("4070s")["name"] == "RTX 4070 Super"


# --- issue 18: several GPUs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("model, gpu, bpw, ctx, mode", [("qwen2.5-14b", "RTX 4080 Super", 5.5, 32768, "fp16"),
                                                        ("llama-3.1-8b", "RTX 3060 12GB", 6.0, 16384, "q4"),
                                                        ("llama-3.3-70b", "H100 80GB SXM", 4.0, 32768, "q4")])
def test_one_device_split_agrees_with_the_single_gpu_planner(model, gpu, bpw, ctx, mode):
    for how in ("autosplit", "split", "tp"):
        m = quiet(plan_multi, model, [gpu], bpw=bpw, max_seq_len=ctx, cache_mode=mode, split_mode=how,
                  depth=ctx // 2)
        p = quiet(plan, model, gpu, bpw=bpw, max_seq_len=ctx, cache_mode=mode, depth=ctx // 2)
        d = m.devices[0]
        if how != "split":  # gpu_split sizes the device's scratch by the modules on it: the same here
            assert d.total_bytes == p.breakdown.vram_total_bytes, how
        assert d.weights_bytes == p.breakdown.weights_bytes and d.kv_cache_bytes + d.kv_temp_bytes == p.kv_cache_bytes
        assert m.fits == p.fits
        assert m.decode["tok_s"] == pytest.approx(p.decode.tok_s, rel=1e-9 if how != "tp" else 0.2)


def test_worked_example_70b_on_two_3090s():
    m = quiet(plan_multi, "llama-3.3-70b", ["RTX 3090", "RTX 3090"], bpw=4.0, max_seq_len=32768, cache_mode="q4")
    p = quiet(plan, "llama-3.3-70b", "RTX 3090", bpw=4.0, max_seq_len=32768, cache_mode="q4")
    assert not p.fits and m.fits  # one card is far too small; two hold it
    d0, d1 = m.devices
    assert d0.layers[0] == 0 and d1.layers[-1] == 79 and max(d0.layers) <= min(d1.layers)
    assert d0.weights_bytes + d1.weights_bytes == p.breakdown.weights_bytes
    assert d0.kv_cache_bytes + d1.kv_cache_bytes == p.breakdown.kv_layers_bytes
    assert d0.kv_temp_bytes == d1.kv_temp_bytes == p.breakdown.kv_temp_bytes  # one FP16 temp layer per device
    assert d0.total_bytes > d1.total_bytes  # autosplit fills the first card before moving on
    assert m.decode["label"].startswith("estimate") and 0 < m.decode["tok_s"] < min(m.decode["per_device_tok_s"])
    assert "FITS on every device" in m.summary() and "GPU 1" in m.summary()


def test_manual_split_and_tensor_parallel():
    kw = dict(bpw=4.0, max_seq_len=32768, cache_mode="q4")
    even = quiet(plan_multi, "llama-3.3-70b", ["RTX 3090"] * 2, split=[20, 24], **kw)
    more = quiet(plan_multi, "llama-3.3-70b", ["RTX 3090"] * 2, split=[12, 24], **kw)
    assert even.split_mode == "split" and len(more.devices[0].layers) < len(even.devices[0].layers)
    tiny = quiet(plan_multi, "llama-3.3-70b", ["RTX 3090"] * 2, split=[5, 5], **kw)
    assert not tiny.fits and "Insufficient space in device allocation" in tiny.verdict()
    tp = quiet(plan_multi, "llama-3.3-70b", ["RTX 3090"] * 2, split_mode="tp", **kw)
    assert [d.kv_heads for d in tp.devices] == [4, 4] and tp.devices[0].layers == list(range(80))
    assert "tensor parallel" in tp.decode["label"] and any("synchronisations" in a for a in tp.assumptions)
    with pytest.raises(CourseError, match="one non-negative GiB figure per GPU"):
        plan_multi(LoadSetup("llama-3.3-70b", gpus=["RTX 3090"] * 2, **kw), split=[20])


def test_cli_several_gpus(capsys):
    base = ["--model", "llama-3.3-70b", "--bpw", "4.0", "--ctx", "32k", "--cache", "q4", "--json"]
    _, a, _ = cli(capsys, *base, "--gpu", "RTX 3090", "--gpu", "RTX 3090")
    _, b, _ = cli(capsys, *base, "--gpu", '2x"RTX 3090"')
    assert json.loads(a) == json.loads(b) and json.loads(a)["kind"] == "multi"
    _, c, _ = cli(capsys, *base, "--gpu", "2x RTX 3090", "--split", "20,24")
    assert json.loads(c)["split_mode"] == "split"
    rc, out, _ = cli(capsys, *base[:-1], "--gpu", "2xRTX 3090", "--tp")
    assert rc == 0 and "tensor parallel" in out


KW70 = dict(bpw=4.0, max_seq_len=32768, cache_mode="q4")
B70 = ["--model", "llama-3.3-70b", "--bpw", "4.0", "--ctx", "32k", "--cache", "q4", "--gpu", "2x RTX 3090"]


def _named_settings_are_ok(m):
    """Every setting the advice names, fed back to the planner, fits with no device tight."""
    named = []
    flags = (("--max-seq-len", "max_seq_len", int), ("--cache", "cache_mode", str), ("--bpw", "bpw", float))
    for flag, key, conv in flags:
        for v in re.findall(rf"\({flag} ([\w.]+)\)", m.advice):
            named.append({key: conv(v)} | ({"split": None, "split_mode": "autosplit"} if key == "bpw" and
                                           m.split_mode == "split" else {}))
    for v in re.findall(r"--split ([\d.,]+)", m.advice):
        named.append({"split": [float(x) for x in v.split(",")], "split_mode": "tp" if m.split_mode == "tp" else
                      "split"})
    for change in named:
        q = replan(m, **change)
        assert q.ok, (change, q.verdict())
    return named


def test_multi_advice_on_the_70b_example():
    m = quiet(plan_multi, "llama-3.3-70b", ["RTX 3090"] * 2, **KW70)
    a = m.advice
    assert a.startswith("Fits on every device, to spare: GPU 0 (RTX 3090) 0.63 GiB, GPU 1 (RTX 3090) 4.03 GiB. "
                        "load_autosplit fills GPU 0 first")
    assert "The longest context this q4 cache allows, loaded the same way (load_autosplit) with no device tight, " \
           "is 57,088 tokens." in a
    assert quiet(plan_multi, "llama-3.3-70b", ["RTX 3090"] * 2, **{**KW70, "max_seq_len": 57088}).ok
    edge = quiet(plan_multi, "llama-3.3-70b", ["RTX 3090"] * 2, **{**KW70, "max_seq_len": 57344})
    assert edge.fits and not edge.ok and edge.devices[1].tight and "TIGHT" in edge.verdict()
    assert edge.advice.startswith("Tight: ") and "GPU 1 fits by 0.28 GiB, less than the 0.31 GiB" in edge.advice
    _named_settings_are_ok(edge)
    # the speed: a layer split vs tensor parallel, whose assumptions are stated once
    tp = quiet(plan_multi, "llama-3.3-70b", ["RTX 3090"] * 2, split_mode="tp", **KW70)
    assert (f"({m.decode['tok_s']:.1f} tok/s, estimate); tensor parallel (add --tp) runs them at once: "
            f"{tp.decode['tok_s']:.1f} tok/s, an estimate") in a and tp.decode["tok_s"] > m.decode["tok_s"]
    assert a.count("synchronisations") == 1 and "160 synchronisations per token" in a and "NVLink" in a
    assert tp.advice.count("synchronisations") == 1 and "is 84,480 tokens" in tp.advice
    assert m.advice in m.summary() and m.to_dict()["advice"] == a
    validate(m.to_dict())


def test_multi_advice_on_a_split_that_overflows_one_device(capsys):
    m = quiet(plan_multi, "llama-3.3-70b", ["RTX 3090"] * 2, split=[24, 24], **KW70)
    a = m.advice
    assert not m.fits and a.startswith("Does not fit: llama-3.3-70b at max_seq_len 32,768 with a q4 cache, this "
                                       "gpu_split: GPU 0 (RTX 3090) is 3.40 GiB short (it holds 27.40 GiB of 24 GiB); "
                                       "room on GPU 1 (8.37 GiB to spare).")
    assert ("(1) a manual split, --split 18.6,24 (model.load(gpu_split=[18.6, 24]), then the cache), which moves "
            "layers 41-54 (14) from GPU 0 to GPU 1; to spare: GPU 0 2.35 GiB, GPU 1 2.63 GiB") in a
    assert "(2) drop --split: load_autosplit places it (to spare: GPU 0 0.63 GiB, GPU 1 4.03 GiB)" in a
    assert "(3) another RTX 3090: --gpu 3x'RTX 3090' holds it with load_autosplit" in a
    # the round trip: the advice's flag, fed back to the planner (the CLI), fits as it says
    flag = re.search(r"(--split [\d.,]+)", a).group(1).split()
    rc, out, _ = cli(capsys, *B70, *flag, "--json")
    doc = validate(out)
    assert rc == 0 and doc["fits"] and not any(d["tight"] for d in doc["devices"])
    assert [round(d["margin_bytes"] / 2**30, 2) for d in doc["devices"]] == [2.35, 2.63]
    assert "Fits on every device" in doc["advice"]
    assert _named_settings_are_ok(m)
    # 12,24: gpu_split too small for the weights and GPU 1 short; the same split fixes it
    small = quiet(plan_multi, "llama-3.3-70b", ["RTX 3090"] * 2, split=[12, 24], **KW70)
    assert "Insufficient space" in small.advice and "GPU 1 (RTX 3090) is 4.64 GiB short" in small.advice
    assert "--split 18.6,24" in small.advice and "moves layers 25-40 (16) from GPU 1 to GPU 0" in small.advice


@pytest.mark.parametrize("ctx, mode", [(131072, "q4"), (65536, "fp16")])
def test_multi_advice_options_in_order_and_never_tight(ctx, mode):
    # with flash-attn: no repeat_kv copy (2 GiB per card at 64k for this 70B), so a quantized cache can keep the length
    m = quiet(plan_multi, "llama-3.3-70b", ["RTX 3090"] * 2, bpw=4.0, max_seq_len=ctx, cache_mode=mode,
              flash_attn=True)
    assert not m.fits and "GPU 1 (RTX 3090) is" in m.advice and "room on GPU 0" in m.advice
    named = _named_settings_are_ok(m)
    assert len(named) >= 2
    order = [m.advice.find(k) for k in ("--split", "--cache", "--max-seq-len", "--bpw", "--gpu 3x") if k in m.advice]
    assert order == sorted(order)
    if mode == "fp16":  # q8 does not keep 65,536 tokens on these two cards; q6 does
        assert "(1) a q6 cache (--cache q6) keeps 65,536 tokens" in m.advice and "--cache q8" not in m.advice
    else:               # GPU 0 has 0.60 GiB to spare against 1.41 GiB short: no split can fix it
        assert "--split" not in m.advice and "(1) max_seq_len 112,896 (--max-seq-len 112896)" in m.advice


def test_multi_advice_shifts_tensor_parallel_shares(capsys):
    # 3090 + 4070, tensor parallel: 8 KV heads split 5:3 by memory (24:12) leave the 4070 short; --split moves shares
    m = quiet(plan_multi, "llama-3.3-70b", ["RTX 3090", "RTX 4070"], bpw=3.25, max_seq_len=32768, cache_mode="q4",
              split_mode="tp")
    assert "GPU 1 (RTX 4070) is 0.23 GiB short" in m.advice
    assert ("(1) shift the tensor-parallel shares: --split 24,11 --tp (to spare: GPU 0 0.50 GiB, GPU 1 0.26 GiB)"
            in m.advice)
    assert m.advice.count("synchronisations") == 1
    _named_settings_are_ok(m)
    rc, out, _ = cli(capsys, "--model", "llama-3.3-70b", "--bpw", "3.25", "--ctx", "32768", "--cache", "q4", "--gpu",
                     "RTX 3090", "--gpu", "RTX 4070", "--split", "24,11", "--tp", "--json")
    assert rc == 0 and validate(out)["fits"]


def test_cli_reserve_per_gpu(capsys):
    gib = 2**30
    rc, out, _ = cli(capsys, *B70, "--reserve-gib", "1.0,0.2", "--json")
    doc = validate(out)
    assert rc == 0 and doc["schema_version"] == SCHEMA_VERSION == "1.2"
    assert [d["reserve_bytes"] for d in doc["devices"]] == [gib, round(0.2 * gib)]
    assert {d["reserve_source"] for d in doc["devices"]} == {"given by the caller"}
    py = quiet(plan_multi, "llama-3.3-70b", ["RTX 3090"] * 2, reserve_gib=[1.0, 0.2], **KW70).to_dict()
    assert doc["devices"] == py["devices"]
    _, one, _ = cli(capsys, *B70, "--reserve-gib", "0.25", "--json")  # one number: the display GPU, the others 0
    assert [d["reserve_bytes"] for d in json.loads(one)["devices"]] == [gib // 4, 0]
    _, single, _ = cli(capsys, "--model", "qwen2.5-7b", "--bpw", "5", "--ctx", "8k", "--gpu", "RTX 4090",
                       "--reserve-gib", "0", "--json")
    assert validate(single)["breakdown"]["reserve_bytes"] == 0
    _, rows, _ = cli(capsys, "--model", "qwen2.5-7b", "--bpw", "5", "--ctx", "8k", "--all-gpus", "--reserve-gib",
                     "1", "--json")
    assert {r["reserve_bytes"] for r in validate(rows)["rows"]} == {gib}
    for bad, why in (("1,2,3", "gives 3 reserves for 2 GPUs"), ("0.5,-1", "-1 is not a reserve"),
                     ("-0.5", "-0.5 is not a reserve"), ("lots", "give GiB"), ("inf", "inf is not a reserve")):
        rc, _, err = cli(capsys, *B70, f"--reserve-gib={bad}")
        assert rc == 2 and err.count("\n") == 1 and why in err, err
    rc, _, err = cli(capsys, "--model", "qwen2.5-7b", "--bpw", "5", "--all-gpus", "--reserve-gib", "1,1")
    assert rc == 2 and "for 1 GPU:" in err
    with pytest.raises(CourseError, match="reserve must be zero or a positive"):
        plan_multi(LoadSetup("llama-3.3-70b", gpus=["RTX 3090"] * 2, reserve_gib=[0.5, -1], **KW70))


def test_all_gpus_lists_every_known_gpu(capsys):
    rc, out, _ = cli(capsys, "--model", "qwen2.5-7b", "--bpw", "5.0", "--ctx", "8k", "--all-gpus", "--json")
    doc = json.loads(out)
    assert rc == 0 and [r["gpu"] for r in doc["rows"]] == list(GPUS)
    validate(doc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = all_gpus(LoadSetup("qwen2.5-14b", bpw=5.5, max_seq_len=32768), gpus=["RTX 4080 Super", "RTX 4090"])
    assert [r["fits"] for r in rows] == [False, True]


# --- issue 18: any local EXL2 checkpoint -----------------------------------------------------------------------

def test_plan_dir_uses_the_files_real_bits(capsys, tmp_path):
    folder = EXL2["tiny_llama_b3.0"]
    rc, out, _ = cli(capsys, str(folder), "--gpu", "RTX 3060 12GB", "--ctx", "2k", "--json")
    doc = json.loads(out)
    assert rc == 0 and "read from the EXL2 tensors" in doc["breakdown"]["weights_source"]
    other = quiet(plan, EXL2["tiny_llama_b4.5"], "RTX 3060 12GB", max_seq_len=2048)
    assert other.breakdown.weights_bytes > doc["breakdown"]["weights_bytes"]  # 4.5 bpw files hold more than 3.0
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    cfg = json.loads((broken / "config.json").read_text())
    del cfg["num_hidden_layers"]
    cfg["architectures"] = ["FooBarForCausalLM"]
    (broken / "config.json").write_text(json.dumps(cfg))
    rc, _, err = cli(capsys, str(broken), "--gpu", "RTX 3060 12GB")
    assert rc == 2 and err.count("\n") == 1 and "num_hidden_layers" in err


# --- issue 18: the JSON schema ---------------------------------------------------------------------------------

@pytest.mark.parametrize("model", bundled_models())
def test_json_schema_on_every_bundled_model(model, capsys):
    rc, out, _ = cli(capsys, "--model", model, "--bpw", "4.0", "--ctx", "8k", "--gpu", "RTX 4090", "--json")
    assert rc == 0
    doc = validate(out)
    assert doc["schema_version"] == SCHEMA_VERSION == "1.2" and doc["schema_version"].startswith(
        load_schema()["properties"]["schema_version"]["pattern"][1] + ".")
    validate(quiet(plan_multi, model, ["RTX 3090", "RTX 3090"], bpw=4.0, max_seq_len=8192).to_dict())


def test_json_schema_is_versioned_and_refuses_a_broken_plan():
    schema = json.loads(SCHEMA_PATH.read_text())
    assert schema["$schema"].endswith("2020-12/schema") and "schema_version" in schema["required"]
    doc = quiet(plan, "qwen2.5-7b", "RTX 4090", bpw=5.0, max_seq_len=8192).to_dict()
    del doc["decode_estimate_tok_s"]
    with pytest.raises(CourseError, match="does not follow plan.schema.json"):
        validate(doc)
    with pytest.raises(CourseError, match="schema_version"):
        validate({**doc, "schema_version": "2.0"})


# --- issue 18: the widget --------------------------------------------------------------------------------------

def test_widget_redraws_when_three_controls_change():
    pytest.importorskip("ipywidgets")
    from helpers.planning.widget import planner_widget

    w = planner_widget(LoadSetup("qwen2.5-14b", bpw=5.5, max_seq_len=32768, gpus="RTX 4080 Super"))
    assert "DOES NOT FIT" in w.verdict.value and 'data-fits="false"' in w.bars.value
    w.cache.value = "q8"                       # 1: the cache mode
    assert "FITS" in w.verdict.value and "DOES NOT" not in w.verdict.value and 'data-fits="true"' in w.bars.value
    assert w.state["fits"] == quiet(plan, "qwen2.5-14b", "RTX 4080 Super", bpw=5.5, max_seq_len=32768,
                                    cache_mode="q8").fits
    speed = w.speed.value
    w.flash.value = True                        # 2: flash-attn
    assert w.speed.value != speed and "flash-attn" in w.speed.value
    w.gpus.value = ("RTX 3090", "RTX 3090")     # 3: several GPUs
    w.model.value = "llama-3.3-70b"             # 4: the model
    w.bpw.value = 4.0                           # 5: the bpw
    assert w.bars.value.count('class="pl-bar"') == 2 and "FITS on every device" in w.verdict.value
    w.max_seq_len.value = 131072                        # 6: the context: GPU 1 overflows
    assert "DOES NOT FIT" in w.verdict.value and w.depth.value == 131071   # a full cache: the last free position
    w.model.value = "nonesuch"
    assert "error: unknown model" in w.verdict.value


# --- plots -----------------------------------------------------------------------------------------------------

def test_planner_plots_have_titles():
    pytest.importorskip("matplotlib")
    from helpers.plots import planner as pp

    fig = pp.plot_iso_vram(LoadSetup("llama-3.1-8b"), cards_gib=(12, 24), bpws=[3.0, 5.0, 7.0])
    assert fig._suptitle.get_text() and len(fig.axes) == 2 and len(fig.axes[0].lines) >= 4
    m = quiet(plan_multi, "llama-3.3-70b", ["RTX 3090"] * 2, bpw=4.0, max_seq_len=32768, cache_mode="q4")
    assert pp.plot_devices(m).axes[0].get_title()


def test_gpu_typos_suggest_the_nearest_card_and_an_ambiguous_name_asks():
    with pytest.raises(CourseError, match=r"Did you mean 'RTX 4060'") as e:
        gpu_spec("RTX 4061")
    assert "RTX 4090" not in str(e.value).split("Known:")[0].split("Did you mean")[1].split("?")[0].split(",")[0]
    with pytest.raises(CourseError, match="two memory sizes.*'RTX 4060 Ti 8GB' or 'RTX 4060 Ti 16GB'"):
        gpu_spec("RTX 4060 Ti")
    for name, gib in (("RTX 4060", 8), ("RTX 4060 Ti 8GB", 8), ("RTX 3060 Ti", 8), ("RTX 3070", 8), ("RTX 2060", 6)):
        assert gpu_spec(name)["vram_gib"] == gib
    assert gpu_spec("H100 80GB SXM")["host"] == "server" and gpu_spec("RTX 4090")["host"] == "desktop"


def test_split_layers_never_look_shared_between_devices():
    """One kind of on-screen disagreement: ranges '0-46' and '46-79' for two devices. A layer split between them
    (attention on one, MLP on the next) is marked 'a' and 'm'."""
    m = quiet(plan_multi, "llama-3.3-70b", ["RTX 3090"] * 2, **KW70)
    r0, r1 = (d.layer_range() for d in m.devices)
    shared = set(m.devices[0].layers) & set(m.devices[1].layers)
    assert len(shared) <= 1
    if shared:
        (layer,) = shared
        assert r0.endswith(f"{layer}a") and r1.startswith(f"{layer}m"), (r0, r1)
        assert "'a' only that layer's attention" in m.table()


def test_the_plan_shows_speed_at_several_depths_with_the_same_paths_ceiling():
    p = quiet(plan, "qwen2.5-14b", "RTX 4080 Super", bpw=5.5, max_seq_len=4096)
    depths = [e.depth for e in p.decode_by_depth]
    assert depths == [256, 1024, 2048, 4095] and p.depth == 4095
    for e in p.decode_by_depth:
        assert not e.position_bytes.flash_attn and e.tok_s < e.ceiling_tok_s     # the path the line states
    assert p.decode_roofline_tok_s["full_cache"] == pytest.approx(p.decode_by_depth[-1].ceiling_tok_s)
    text = p.summary()
    assert "no flash-attn: torch attention with repeat_kv" in text and "ceiling of the same path" in text
    assert "not known to the model" in text
    doc = validate(p.to_dict())
    assert [r["depth"] for r in doc["decode_estimate_by_depth"]] == depths


def test_long_context_advice_is_right_for_the_model_and_said_once(capsys):
    rc, out, err = cli(capsys, "--model", "llama-3.1-8b", "--bpw", "5", "--ctx", "192k", "--gpu", "H200")
    assert rc == 0 and "YaRN" not in out + err and (out + err).count("choose a model trained for a longer") == 1
    rc, out, err = cli(capsys, "--model", "qwen2.5-14b", "--bpw", "5.5", "--ctx", "64k", "--gpu", "H100 80GB SXM")
    assert rc == 0 and (out + err).count("YaRN") == 1
    p = quiet(plan, "qwen2.5-14b", "H100 80GB SXM", bpw=5.5, max_seq_len=32768)
    assert all(v <= 32768 for v in p.longest_within_trained().values())
    assert "*" in p._longest_line() and "trained for" in p._longest_line()
