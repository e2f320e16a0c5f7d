"""The embed and retrieve stages: embedding query and gallery with each epoch's model
(embedding, with WiSE-FT mixing from wise_ft), ranking them into retrieval results with
re-ranking (rerank, retrieval) and one picture per epoch (pictures).

May import: the foundations, clipcore.data, clipcore.ranking and clipcore.model."""
