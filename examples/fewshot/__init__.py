"""Few-shot learning examples and their helpers (Omniglot data and tasks, the Conv4 model)."""
