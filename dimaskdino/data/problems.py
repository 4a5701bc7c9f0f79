"""Collects data problems (bad files, bad annotations) so that loading never crashes deep inside.

Every problem is logged once, with the file it concerns, the first time it is seen; training
prints `DataProblems.summary()` at the end (a count per kind). Problems are counted per
occurrence: a file problem once per file (whichever loader meets it), an annotation problem once
per annotation part (`occurrence` names it), so three bad polygons of one image count three. Loading code reports a problem and
then skips or repairs the sample; only a malformed json (a schema error) is fatal.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass

logger = logging.getLogger("dimaskdino.data")

# For collectors whose problems are merged (and logged) elsewhere, or deliberately dropped.
SILENT = logging.getLogger("dimaskdino.data.silent")
SILENT.addHandler(logging.NullHandler())
SILENT.propagate = False

# Kinds of problems (the keys of `DataProblems.counts()`).
MISSING_IMAGE = "missing image file"
CORRUPT_IMAGE = "corrupt or unreadable image"
SIZE_MISMATCH = "image size differs from json"
NO_ANNOTATIONS = "image without annotations"
ZERO_AREA_BOX = "zero-area box"
DEGENERATE_POLYGON = "degenerate polygon"
BAD_RLE = "bad RLE"
NO_SEGMENTATION = "annotation without segmentation"
EMPTY_MASK = "annotation with an empty mask"


@dataclass(frozen=True)
class Problem:
    kind: str
    file: str
    detail: str = ""
    occurrence: str = ""  # what in the file (e.g. "annotation 12, part 0"); "" = the file itself

    def __str__(self) -> str:
        detail = f": {self.detail}" if self.detail else ""
        return f"{self.kind} ({self.file}){detail}"


class DataProblems:
    """Thread-safe collector: `add` logs a (kind, file, occurrence) the first time it is seen.

    `max_logged_per_kind` bounds the log lines (a dataset with thousands of degenerate polygons
    must not flood the log); every problem is still counted.
    """

    def __init__(self, max_logged_per_kind: int = 20, log: logging.Logger | None = None):
        self.max_logged_per_kind = max_logged_per_kind
        self._log = log or logger
        self._seen: dict[tuple[str, str, str], Problem] = {}
        self._logged = Counter()
        self._lock = threading.Lock()

    def add(self, kind: str, file: str, detail: str = "", occurrence: str = "") -> bool:
        """Record a problem; returns True when this occurrence is new (and was reported)."""
        key = (kind, str(file), occurrence)
        with self._lock:
            if key in self._seen:
                return False
            problem = Problem(kind, str(file), detail, occurrence)
            self._seen[key] = problem
            self._logged[kind] += 1
            n = self._logged[kind]
        if n <= self.max_logged_per_kind:
            self._log.warning("data problem: %s", problem)
        if n == self.max_logged_per_kind:
            self._log.warning("data problem: further '%s' problems are counted, not logged", kind)
        return True

    def merge(self, other: "DataProblems") -> None:
        for p in other.problems():
            self.add(p.kind, p.file, p.detail, p.occurrence)

    def problems(self) -> list[Problem]:
        with self._lock:
            return list(self._seen.values())

    def counts(self) -> dict[str, int]:
        """Number of problems (occurrences) per kind."""
        with self._lock:
            return dict(Counter(kind for kind, _, _ in self._seen))

    def files(self, kind: str | None = None) -> set[str]:
        with self._lock:
            return {f for k, f, _ in self._seen if kind is None or k == kind}

    def __len__(self) -> int:
        with self._lock:
            return len(self._seen)

    def summary(self) -> str:
        counts = self.counts()
        if not counts:
            return "data problems: none"
        parts = ", ".join(f"{n} x {kind}" for kind, n in sorted(counts.items()))
        return f"data problems: {sum(counts.values())} ({parts})"
