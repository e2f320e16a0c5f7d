"""Using a trained model outside the pipeline: loading a model file with its run's embed and
retrieve settings (loading), a saved gallery index that later queries search (gallery_index),
the search web service and its page (service, static/) and the ONNX export (onnx_export).

May import: the foundations, clipcore.data, clipcore.ranking, clipcore.model and clipcore.retrieve."""
