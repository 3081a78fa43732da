"""NVIDIA's Windows sysmem fallback (notebook 04): pcie (link bandwidth), spill (the speed model), seed (the reported
case and the ways out), probe (does this driver spill?), and on Linux + CUDA the emulator: hostalloc (mapped host
memory), emulator (VRAM budget and routing), routed_load (exllamav2 module by module), compare (native vs emulated),
linux_oom (Linux's out-of-memory instead), emulated_report (recorded runs)."""
