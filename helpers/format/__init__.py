"""The EXL2 file format, without a GPU: config (config.json), header (safetensors headers, torch-free), names
(tensor names), bits (bit widths and mixes), packing (bit streams and scales), reader (open and dequantize),
quantize (round-to-nearest), writer (write a checkpoint), tiny (small test models), synthetic (shape-faithful
random checkpoints), inspect (per-layer bits and bytes)."""
