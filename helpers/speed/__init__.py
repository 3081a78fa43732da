"""Decode and prefill speed (notebook 03): roofline (bytes per token over bandwidth), matrix (what to measure),
harness (timing on a loaded backend), profile (where a step's time goes), report (tables, recorded results)."""
