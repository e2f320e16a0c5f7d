"""The data a pipeline reads: decoding image files (images) and the train/val/query/gallery
manifests that prepare writes from a data root (manifests).

May import: the foundations (clipcore.errors, files, params, paths, stage) only."""
