"""Facts about models and GPUs the course plans with: decoder shapes from config.json, GPU datasheets."""
