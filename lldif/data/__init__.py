"""Data for LLDif: dataset readers, the low-light simulator, synthetic faces, landmarks and text embeddings."""
