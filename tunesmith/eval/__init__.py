"""Evaluation: generation, answer metrics and (later) the fine-tune vs prompt vs RAG comparison."""
