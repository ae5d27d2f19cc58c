"""Vector indexes: FAISS stores of embeddings with ids and metadata, saved to a folder."""
