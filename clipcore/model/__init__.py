"""The model: building CLIP with its head (factory) from local files or the hub (weights),
backbone features and their caching (features), model files and training checkpoints
(checkpoint), and processes that share the work (distributed: DDP, rank-aware writing).

May import: the foundations and clipcore.data."""
