"""The interactive planner of notebook 05: ipywidgets controls over ``plan`` (one GPU) and ``plan_multi`` (several).

The logic is plain Python: ``compute`` turns the controls' values into what the widget shows (the verdict, a stacked
VRAM bar per device, the longest context per cache mode, the decode estimate), and ``bar_html`` draws the bars as
HTML. ``PlannerWidget`` only wires ipywidgets controls to them (ipywidgets is imported when a widget is made), so the
tests drive the controls and read what the widget shows.
"""
from __future__ import annotations

import html
import warnings

from helpers.core.errors import CourseError
from helpers.core.units import GIB
from helpers.format.bits import BPW_RANGE
from helpers.memory.cache_modes import CACHE_MODES
from helpers.memory.setup import LoadSetup
from helpers.planning.multi import plan_multi
from helpers.planning.planner import PAGE, plan
from helpers.specs.gpus import GPUS
from helpers.specs.shapes import bundled_models

#: bar segments: (key, label, colour)
SEGMENTS = (("weights", "weights", "#4c72b0"), ("cache", "KV cache", "#dd8452"),
            ("scratch", "scratch + RoPE", "#55a868"), ("transient", "transients", "#c44e52"),
            ("other", "CUDA context + reserve", "#8c8c8c"))
CONTEXT_MAX = 131072


def compute(controls: dict, depth: int | None = None) -> dict:
    """What the widget shows for these control values (``LoadSetup``'s fields: model, bpw, max_seq_len, cache_mode,
    gpus, flash_attn): {'ok', 'verdict', 'fits', 'bars': [{'device', 'vram', 'total', 'fits', 'segments': {key:
    bytes}}], 'longest': {mode: tokens}, 'speed': str, 'error': str|None}. A bad value is an error it shows."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            setup = LoadSetup(**{**controls, "gpus": tuple(controls.get("gpus") or ["RTX 4080 Super"])})
            if len(setup.gpus) == 1:
                p = plan(setup, depth)
                bd = p.breakdown
                bars = [{"device": p.gpu["name"], "vram": p.gpu["vram_bytes"], "total": bd.vram_total_bytes,
                         "fits": p.fits,
                         "segments": {"weights": bd.weights_bytes, "cache": bd.kv_cache_bytes,
                                      "scratch": bd.scratch_bytes, "transient": bd.transient_bytes,
                                      "other": bd.cuda_context_bytes + bd.reserve_bytes}}]
                speed = p.speed_line()
                longest = dict(p.longest_safe_context)
                verdict = p.verdict()
            else:
                m = plan_multi(setup, depth=depth)
                bars = [{"device": f"GPU {d.index}: {d.gpu['name']}", "vram": d.gpu["vram_bytes"],
                         "total": d.total_bytes, "fits": d.fits,
                         "segments": {"weights": d.weights_bytes, "cache": d.kv_cache_bytes + d.kv_temp_bytes,
                                      "scratch": d.scratch_bytes + d.rope_bytes, "transient": d.transient_bytes,
                                      "other": d.cuda_context_bytes + d.reserve_bytes}} for d in m.devices]
                e = m.decode
                speed = ("decode estimate: none (a bandwidth is unknown)" if e is None else
                         f"decode at depth {m.depth:,} ({e['label']}): {e['tok_s']:.1f} tok/s (likely "
                         f"{e['tok_s_low']:.1f}-{e['tok_s_high']:.1f})")
                longest = {}
                verdict = m.verdict()
            fits = all(b["fits"] for b in bars)
    except CourseError as exc:
        return {"ok": False, "verdict": f"error: {exc}", "fits": False, "bars": [], "longest": {}, "speed": "",
                "error": str(exc)}
    return {"ok": True, "verdict": verdict, "fits": fits, "bars": bars, "longest": longest, "speed": speed,
            "error": None}


def bar_html(state: dict) -> str:
    """One stacked horizontal bar per device, widths in proportion to the card's memory, a red frame when it does
    not fit. Plain HTML (renders in JupyterLab and in a saved notebook alike)."""
    rows = []
    for b in state["bars"]:
        scale = max(b["vram"], b["total"])
        cells = "".join(
            f'<div class="pl-seg pl-{k}" title="{label}: {b["segments"][k] / GIB:.2f} GiB" style="width:'
            f'{100 * b["segments"][k] / scale:.2f}%;background:{colour};height:18px"></div>'
            for k, label, colour in SEGMENTS if b["segments"][k] > 0)
        card = 100 * b["vram"] / scale
        frame = "#2a9d3a" if b["fits"] else "#d62728"
        rows.append(
            f'<div class="pl-bar" data-fits="{str(b["fits"]).lower()}" style="margin:2px 0">'
            f'<div style="font-size:12px">{html.escape(str(b["device"]))}: {b["total"] / GIB:.2f} of '
            f'{b["vram"] / GIB:.2f} GiB</div>'
            f'<div style="position:relative;display:flex;width:100%;box-sizing:border-box;border:2px solid {frame}">'
            f'{cells}'
            f'<div style="position:absolute;left:{card:.2f}%;top:-3px;height:24px;border-left:2px dashed black">'
            f'</div></div></div>')
    legend = " ".join(f'<span style="background:{c};color:white;padding:0 4px;font-size:11px">{lab}</span>'
                      for _, lab, c in SEGMENTS)
    return "".join(rows) + f'<div style="margin-top:2px">{legend} (dashed line: the card\'s memory)</div>'


def longest_text(state: dict) -> str:
    if not state["longest"]:
        return "longest context per cache mode: (one GPU only)"
    return ("longest context per cache mode, leaving load_autosplit's reserve free: "
            + ", ".join(f"{m} {n:,}" for m, n in state["longest"].items()))


class PlannerWidget:
    """Controls (model, bpw, context, cache mode, GPUs, flash-attn, depth) and what they show (verdict, bars,
    longest contexts, speed). Changing any control recomputes everything. ``widget`` is the ipywidgets box."""

    def __init__(self, setup: LoadSetup | None = None, depth: int | None = None):
        import ipywidgets as w

        s = setup or LoadSetup("qwen2.5-14b", bpw=5.5, max_seq_len=32768, gpus="RTX 4080 Super")
        lo, hi = BPW_RANGE
        style = {"description_width": "90px"}
        self.model = w.Combobox(value=s.model.exl2_dir or s.model.name, options=bundled_models(),
                                description="model", ensure_option=False, placeholder="bundled name or EXL2 folder",
                                style=style)
        self.bpw = w.FloatSlider(value=s.bpw or 5.0, min=lo, max=hi, step=0.05, description="bpw", style=style)
        self.max_seq_len = w.IntSlider(value=s.max_seq_len, min=PAGE, max=CONTEXT_MAX, step=PAGE,
                                       description="max_seq_len", style=style)
        self.cache = w.Dropdown(value=s.cache_mode, options=list(CACHE_MODES), description="cache", style=style)
        self.gpus = w.SelectMultiple(value=tuple(g["name"] for g in s.gpus if g["name"] in GPUS), options=list(GPUS),
                                     rows=6, description="GPU(s)", style=style)
        self.flash = w.Checkbox(value=s.flash_attn, description="flash-attn installed")
        last = s.max_seq_len - 1
        self.depth = w.IntSlider(value=min(depth if depth is not None else last, last), min=0, max=last, step=PAGE,
                                 description="depth", style=style)
        self.verdict = w.HTML()
        self.bars = w.HTML()
        self.longest = w.HTML()
        self.speed = w.HTML()
        self.state: dict = {}
        controls = [self.model, self.bpw, self.max_seq_len, self.cache, self.gpus, self.flash, self.depth]
        for c in controls:
            c.observe(self._changed, names="value")
        self.widget = w.VBox([w.HBox([w.VBox(controls[:4]), w.VBox(controls[4:])]), self.verdict, self.bars,
                              self.longest, self.speed])
        self.widget.add_class("exl2-planner")
        self.update()

    def _changed(self, change) -> None:
        if change["owner"] is self.max_seq_len:  # the depth follows a full cache, and stays below the length
            last = self.max_seq_len.value - 1              # the deepest position the cache can decode at
            full = self.depth.value >= change["old"] - 1
            self._hold = True
            try:
                if last > self.depth.max:
                    self.depth.max = last
                if full or self.depth.value > last:
                    self.depth.value = last
                self.depth.max = last
            finally:
                self._hold = False
        if not getattr(self, "_hold", False):
            self.update()

    def update(self) -> dict:
        self.state = compute({"model": self.model.value, "bpw": self.bpw.value, "max_seq_len": self.max_seq_len.value,
                              "cache_mode": self.cache.value, "gpus": list(self.gpus.value),
                              "flash_attn": self.flash.value}, self.depth.value)
        colour = "#2a9d3a" if self.state["fits"] else "#d62728"
        self.verdict.value = (f'<b class="pl-verdict" style="color:{colour}">{html.escape(self.state["verdict"])}'
                              "</b>")
        self.bars.value = bar_html(self.state)
        self.longest.value = f'<span class="pl-longest">{html.escape(longest_text(self.state))}</span>'
        self.speed.value = f'<span class="pl-speed">{html.escape(self.state["speed"])}</span>'
        return self.state

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


def planner_widget(setup: LoadSetup | None = None, depth: int | None = None) -> PlannerWidget:
    """The interactive planner, its controls set from ``setup`` (needs ipywidgets: ``pip install ipywidgets``)."""
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        raise CourseError("the interactive planner needs ipywidgets: pip install ipywidgets (it is in "
                          "requirements.txt), then restart the kernel") from None
    return PlannerWidget(setup, depth)
