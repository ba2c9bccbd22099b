"""Prompt signatures: the unit-norm vectors approximate caching compares (cosine similarity) to
find a finished request whose prompt is close to a new one's.

- `embedding_signature`: a real text encoder's output, pooled over its tokens when it has them
  (the per-token hidden states; a pooled embedding, as CLIP's, is used as it is).
- `word_signature`: the emulated backend's encoders output placeholders, so their signature is the
  prompt's words, each hashed to its own direction: two prompts' similarity is then the share of
  words they have in common (6 of 7 shared words: 0.86), a structure a benchmark can control.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import numpy as np

WORD_DIMENSIONS = 1024  # a prompt's few dozen words rarely share one (and it travels with the result)


def _unit(vector: np.ndarray) -> list[float]:
    norm = float(np.linalg.norm(vector))
    return [float(x) for x in vector / norm] if norm > 0 else []


def embedding_signature(output: Any) -> list[float]:
    array = np.asarray(output, dtype=np.float32)
    if array.ndim == 3:  # (batch, tokens, features): one prompt's hidden states
        array = array.mean(axis=1)
    return _unit(array.reshape(-1))


def word_signature(text: str) -> list[float]:
    vector = np.zeros(WORD_DIMENSIONS, dtype=np.float32)
    for word in re.findall(r"\w+", text.lower()):
        digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
        vector[int.from_bytes(digest, "little") % WORD_DIMENSIONS] += 1.0
    return _unit(vector)
