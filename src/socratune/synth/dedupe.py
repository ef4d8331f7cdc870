"""Near-duplicate search for generated dialogues: character shingles, MinHash candidates, exact Jaccard."""

from __future__ import annotations

import zlib


class NearDuplicates:
    """Near-duplicate search by Jaccard similarity of character shingle sets.

    MinHash (63 permutations in 21 bands of 3) finds candidates; every candidate's exact Jaccard
    similarity decides, so there are no false positives. A pair at the 0.6 threshold becomes a
    candidate with probability 1 - (1 - 0.6^3)^21 = 99.4 %, one at 0.8 with > 99.99 %.
    """

    BANDS, ROWS = 21, 3
    _PRIME = (1 << 31) - 1

    def __init__(self, threshold: float, shingle_chars: int):
        import numpy as np

        self.threshold, self.n = threshold, shingle_chars
        rng = np.random.default_rng(20240611)  # fixed: signatures must agree across runs and resumes
        size = self.BANDS * self.ROWS
        self._a = rng.integers(1, self._PRIME, size, dtype=np.uint64)
        self._b = rng.integers(0, self._PRIME, size, dtype=np.uint64)
        self._buckets: dict[tuple[int, bytes], list[str]] = {}
        self._shingles: dict[str, frozenset[str]] = {}

    def shingles(self, text: str) -> frozenset[str]:
        text = "".join(text.split())  # spacing and line breaks do not make a dialogue new
        return frozenset(text[i:i + self.n] for i in range(max(1, len(text) - self.n + 1)))

    def _bands(self, shingles: frozenset[str]) -> list[tuple[int, bytes]]:
        import numpy as np

        hashes = np.array([zlib.crc32(s.encode("utf-8")) for s in shingles], dtype=np.uint64) % self._PRIME
        signature = ((self._a[:, None] * hashes[None, :] + self._b[:, None]) % self._PRIME).min(axis=1)
        rows = signature.reshape(self.BANDS, self.ROWS)
        return [(band, rows[band].tobytes()) for band in range(self.BANDS)]

    def find(self, text: str) -> tuple[str, float] | None:
        """The most similar indexed key at or above the threshold, with its similarity."""
        shingles = self.shingles(text)
        candidates = {key for band in self._bands(shingles) for key in self._buckets.get(band, [])}
        best = None
        for key in candidates:
            other = self._shingles[key]
            similarity = len(shingles & other) / len(shingles | other)
            if similarity >= self.threshold and (best is None or similarity > best[1]):
                best = (key, similarity)
        return best

    def add(self, key: str, text: str) -> None:
        shingles = self.shingles(text)
        self._shingles[key] = shingles
        for band in self._bands(shingles):
            self._buckets.setdefault(band, []).append(key)


def dialogue_text(messages: list[dict[str, str]]) -> str:
    return "\n".join(m["content"] for m in messages if m["role"] != "system")
