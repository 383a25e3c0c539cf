"""Text for conditioning and evaluation (SPEC M1-M3).

- :mod:`genlab.text.tokenizer`: WordPiece / BPE tokenizers trained offline on captions.
- :mod:`genlab.text.encoders`: the one text-encoder interface (token states, pooled vector, mask) and
  the ``tiny`` and ``onehot`` encoders; :mod:`genlab.text.minilm` the frozen all-MiniLM-L6-v2.
- :mod:`genlab.evaluation.text` (evaluation, not here): CLIP judges (runs or shipped evaluators), zero-shot, retrieval,
  CLIP score and R-precision of captioned images.
"""
