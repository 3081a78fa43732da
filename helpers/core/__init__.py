"""The ground floor, needing nothing else of the course: errors (one-line user errors), paths, units (GiB),
progress (bars), atomic (write-then-rename), results (recorded results with provenance), devices (torch/CUDA,
NVML, CPU and RAM readings that degrade to "not available")."""
