"""What runs a model: reference (the course's own pure-PyTorch decoder), exllama (the one front door to
exllamav2, CUDA only), backend (one API over both), agreement (comparing two engines' logits)."""
