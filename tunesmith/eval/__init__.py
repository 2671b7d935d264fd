"""Evaluation: fine-tuning vs prompt engineering vs RAG vs fine-tuning + RAG, measured on the user's data.

`questions` loads the questions (split by fact), `retrieval` chunks documents and retrieves (BM25,
dense, hybrid), `arms` builds each arm's conversation, `metrics` scores answers with bootstrap CIs
over facts, `compare` runs the comparison on a finished run, and `report` writes `report.html`.
"""
