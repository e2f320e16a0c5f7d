"""The train stage: the training loop (training), its losses (losses/), batches (sampling),
the train/val images and their features (splits), the validation protocol (validation,
evaluation), resuming (resume) and what a run writes (run_files).

May import: the foundations, clipcore.data, clipcore.ranking and clipcore.model."""
