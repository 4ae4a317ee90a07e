"""Training on Ray Train: typed configs, paper recipes, the per-worker loop and the trainer."""
