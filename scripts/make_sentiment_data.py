"""Regenerate dynsdpb_kernels/tools/data/rt_snippets.jsonl.gz (the sentiment task of `dynsdpb study`).

Needs the vaderSentiment 3.3.2 source distribution (MIT), fetched without installing it:
    pip download --no-deps --no-binary :all: -d DIR vaderSentiment==3.3.2
    python scripts/make_sentiment_data.py DIR/vaderSentiment-3.3.2.tar.gz
Its nested additional_resources/hutto_ICWSM_2014.tar.gz holds movieReviewSnippets_GroundTruth.txt: Rotten
Tomatoes review sentences (Pang & Lee) with the mean of human valence ratings. Label: positive when the
mean is > 0, negative when < 0 (neutral sentences are dropped). Kept: distinct sentences of at most
MAX_CHARS characters; a seeded shuffle then takes TRAIN and TEST sentences, balanced by label.
"""

from __future__ import annotations

import gzip
import json
import random
import sys
import tarfile
from pathlib import Path

TRAIN, TEST = 320, 1200  # per split, half positive and half negative
MAX_CHARS = 160  # short sentences: prompt + label stay within the study's 64 tokens
SEED = 0
INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
DATA = Path(__file__).resolve().parent.parent / "dynsdpb_kernels" / "tools" / "data"


def read_snippets(sdist: Path) -> list[tuple[str, float]]:
    """(sentence, mean valence) pairs of the movie-review snippet file inside the sdist."""
    with tarfile.open(sdist) as outer:
        inner_file = outer.extractfile(INNER)
        with tarfile.open(fileobj=inner_file) as inner:
            text = inner.extractfile(MEMBER).read().decode("utf-8", "replace")
    rows = []
    for line in text.splitlines():
        parts = line.split("\t", 2)
        if len(parts) == 3:
            rows.append((parts[2].strip(), float(parts[1])))
    return rows


def main(sdist: Path) -> None:
    seen: set[str] = set()
    by_label: dict[str, list[str]] = {"positive": [], "negative": []}
    for sentence, valence in read_snippets(sdist):
        if valence == 0 or not sentence or len(sentence) > MAX_CHARS or sentence in seen:
            continue
        seen.add(sentence)
        by_label["positive" if valence > 0 else "negative"].append(sentence)
    rng = random.Random(SEED)
    records = []
    for label, sentences in sorted(by_label.items()):
        rng.shuffle(sentences)
        records += [{"split": "train", "text": s, "label": label} for s in sentences[: TRAIN // 2]]
        records += [{"split": "test", "text": s, "label": label} for s in sentences[TRAIN // 2 : (TRAIN + TEST) // 2]]
    rng.shuffle(records)
    with gzip.open(DATA / "rt_snippets.jsonl.gz", "wt", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    with tarfile.open(sdist) as outer:
        (DATA / "rt_snippets_LICENSE.txt").write_bytes(outer.extractfile("vaderSentiment-3.3.2/LICENSE.txt").read())
    counts = {split: sum(r["split"] == split for r in records) for split in ("train", "test")}
    print(f"{counts} sentences from {sum(map(len, by_label.values()))} eligible -> {DATA / 'rt_snippets.jsonl.gz'}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/make_sentiment_data.py PATH/vaderSentiment-3.3.2.tar.gz")
    main(Path(sys.argv[1]))
