"""The data a pipeline reads: decoding image files (images), the pixel pipeline that turns a
decoded image into the model's uint8 input and normalises it on the device (pixels), and the
train/val/query/gallery manifests that prepare writes from a data root (manifests).

May import: the foundations (clipcore.errors, files, params, paths, stage) only."""
