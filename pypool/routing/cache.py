"""Placeholder until the fingerprint cache lands: classifies every time."""
from pypool.routing.classify import DEFAULT_READ_ONLY_FUNCTIONS, Classification, classify


class ClassificationCache:
    def __init__(self, maxsize=10_000, read_only_functions=DEFAULT_READ_ONLY_FUNCTIONS, max_length=None):
        self.read_only_functions = read_only_functions
        self.max_length = max_length
        self.hits = 0
        self.misses = 0
        self._cache: dict[str, Classification] = {}

    def classify(self, sql: str) -> Classification:
        c = self._cache.get(sql)
        if c is None:
            self.misses += 1
            c = self._cache[sql] = classify(sql, self.read_only_functions)
        else:
            self.hits += 1
        return c
