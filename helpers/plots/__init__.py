"""The figures, one file per notebook topic: memory (01, 05), gqa (01), tour (02), speed (03), fallback (04),
planner (05).

`from helpers import plots; plots.plot_x(...)` reaches every figure; each lives in the module of its topic.
"""
from helpers.plots.fallback import (
    plot_emulated,
    plot_hypotheses_vs_depth,
    plot_speed_vs_spill,
    plot_spill_walk,
    plot_time_per_token,
)
from helpers.plots.gqa import plot_gqa
from helpers.plots.memory import (
    plot_breakdown,
    plot_calculator_error,
    plot_kv_cache_vs_context,
    plot_predicted_vs_measured,
    plot_total_vs_context,
)
from helpers.plots.planner import plot_all_gpus, plot_devices, plot_iso_vram
from helpers.plots.speed import (
    plot_attention_cost,
    plot_cache_bytes_by_max_seq_len,
    plot_calibration,
    plot_decode_model,
    plot_decode_time_split,
    plot_speed_vs_depth,
)
from helpers.plots.tour import plot_agreement_steps, plot_bytes_where, plot_layer_bpw, plot_quantization_cost

__all__ = [
    "plot_all_gpus", "plot_attention_cost", "plot_calibration",
    "plot_agreement_steps", "plot_breakdown", "plot_bytes_where", "plot_cache_bytes_by_max_seq_len",
    "plot_calculator_error", "plot_decode_model", "plot_decode_time_split", "plot_devices", "plot_emulated",
    "plot_gqa", "plot_hypotheses_vs_depth", "plot_iso_vram", "plot_kv_cache_vs_context", "plot_layer_bpw",
    "plot_predicted_vs_measured", "plot_quantization_cost", "plot_speed_vs_depth", "plot_speed_vs_spill",
    "plot_spill_walk", "plot_time_per_token", "plot_total_vs_context",
]
