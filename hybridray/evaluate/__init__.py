"""Retrieval evaluation: LAReQA (mono / cross / multi mAP, rank distance), BEIR layout,
Tatoeba bitext; exact metrics, faiss search, batched encoding and reports.

Submodules import torch and faiss; import them directly (``hybridray.evaluate.lareqa``)
so that ``hybridray.evaluate.run`` stays light for the CLI.
"""
