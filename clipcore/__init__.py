"""clipcore: the library behind the DVC stages that fine-tune CLIP for image retrieval."""
