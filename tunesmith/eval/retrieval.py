"""Retrieval for the RAG arms: kept under this name for callers; the code lives in
`tunesmith.data.retrieval`, shared with training on retrieved context (`data.context`)."""

from tunesmith.data.retrieval import DOC_SUFFIXES, Chunk, load_chunks, make_retriever, minilm_dir

__all__ = ["DOC_SUFFIXES", "Chunk", "load_chunks", "make_retriever", "minilm_dir"]
