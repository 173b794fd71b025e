"""Regenerate dynsdpb_kernels/tools/data/gsm_symbolic.jsonl.gz (the finetune command's default dataset).

Needs `pip install reasoning-gym==0.1.25` (Apache-2.0); the package itself never imports it.
GSM8K-style word problems with worked solutions ending in "#### <answer>", from reasoning-gym's
gsm_symbolic generator: a train split (seed 1) and a test split (seed 2) with no question in both.
"""

import gzip
import json
from pathlib import Path

import reasoning_gym

TRAIN, TEST = 1200, 200
OUT = Path(__file__).resolve().parent.parent / "dynsdpb_kernels" / "tools" / "data" / "gsm_symbolic.jsonl.gz"


def main() -> None:
    records, seen = [], set()
    for split, size, seed in (("train", TRAIN, 1), ("test", TEST, 2)):
        kept = 0
        for item in reasoning_gym.create_dataset("gsm_symbolic", size=3 * size, seed=seed):
            if kept == size or item["question"] in seen:
                continue
            seen.add(item["question"])
            solution = item["metadata"]["answer_cot"]
            records.append({"split": split, "question": item["question"], "solution": solution, "answer": str(item["answer"])})
            kept += 1
    with gzip.open(OUT, "wt", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"{OUT}: {len(records)} records, {OUT.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
