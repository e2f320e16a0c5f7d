"""Ranking vectors, the core that validation (train) and retrieve share: exact top-k (search),
FAISS approximate indexes behind the same entry point (ann), and the retrieval measures and the
competition score (measures).

May import: the foundations only."""
