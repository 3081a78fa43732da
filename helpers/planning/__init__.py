"""Planning: will a model fit on your GPU(s), how long a context, how fast at depth.

Built on ``memory/`` (every byte exllamav2 0.3.2 allocates) and ``speed/`` (the decode model). Nothing here imports
exllamav2 or torch.

- planner: one model on one GPU: fits or not, the longest context per cache mode, the highest bpw, a decode
  estimate at depth, advice
- multi: one model across several GPUs (load_autosplit, gpu_split, tensor parallel), bytes and verdict per device
- multi_advice: the several-GPU advice (which device is short, then a --split, a smaller cache, a shorter context,
  a lower bpw, another GPU, each re-planned before it is named)
- table, schema, widget: every known card, the versioned JSON Schema, the interactive planner
"""
