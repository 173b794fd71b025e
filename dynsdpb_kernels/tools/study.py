"""The `dynsdpb study` job: does self-distillation from the model's earlier predictions help, and does it
beat spending the same compute on plain CE? CE vs DLB vs DynSDPB, the two halves of the dynamic rule,
compute-matched CE and last-visit teachers, over several seeds on SmolLM2-135M-Instruct.

Arms (ARMS): "ce" (plain cross-entropy on the new samples), "ce_rerun" (plain cross-entropy on DLB's batch:
the previous step's new samples again + the new ones, no distillation: the control that separates DLB's
re-run from its distillation), "dlb" (dynamic=False: constant alpha, tau), "dynsdpb" (dynamic=True),
"alpha_only" (dynamic="alpha") and "tau_only" (dynamic="tau") (DEFAULT_ARMS); the compute-matched arms
(COMPUTE_ARMS adds them): "ce_long" (plain CE for twice the epochs or steps: the sample passes of a
re-running arm), "ce_ls" (label smoothing 0.1), "lastvisit" / "lastvisit_static" (teacher="previous_visit",
dynamic=True / False: each sample taught by its own top-k logits from its previous visit, no re-run) and
"lastvisit_ramp" (lastvisit_static with PS-KD's alpha_t = alpha * t / T over the epochs).
The cost of a run: its updates, sample passes, CPU seconds, and (time_full_model) the seconds per update
of the whole model's forward and backward, measured per arm, times its updates.

Design (docs/study.md and docs/study_compute.md explain the choices):
- The model is loaded as `dynsdpb finetune` loads it. Its lower decoder layers are frozen and their output
  is computed once per example and task (cached on disk); every arm and seed trains the same copy of the
  top `top_layers` decoder layers and the final norm from the same pretrained weights. The tied
  embedding / LM head stays frozen. Logits are computed only at the target positions.
- Every arm sees the same new samples in the same order per seed (OverlapBatchSampler's stream; "ce"
  trains on each batch's new samples only), and makes the same number of optimizer updates. The other
  arms also re-run the previous step's new samples (DLB's batch construction): CE on both halves and, in
  the distilling arms, the distillation term on the re-run half, so they do about twice the
  forward/backward work per update; their wall and CPU time per run are reported. "ce_rerun" does that
  re-run without distillation, so (arm - ce_rerun) is what the distillation term itself adds.
- Seeds change the data order only. The held-out score is computed once at the end of training on the
  whole held-out split; a training curve (held-out metric on a fixed subset) is taken at a few steps.
- Results: one JSON file per (task, arm, seed) under OUT/runs, written atomically and skipped when it
  already exists, so a killed study continues where it stopped; then OUT/results.csv, OUT/summary.json
  (.txt: the printed table, .md: the same as Markdown tables),
  OUT/<task>.png (held-out metric per arm, a dot per seed) and OUT/curves.png.

Tasks: "sentiment" (Rotten Tomatoes review sentences, data/rt_snippets.jsonl.gz: the label word
" positive" / " negative" after "Review: ...\\nSentiment:"; metric: held-out accuracy of the label word as
the greedy next token over the whole vocabulary) and "gsm" (data/gsm_symbolic.jsonl.gz, the worked
solution given the question, truncated to max_length tokens; metric: held-out next-token accuracy, and loss).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .finetune import DATA_PATH, IGNORE_INDEX, FinetuneConfig, load_examples, load_model, tokenize
from ..module import DynSDPBLoss
from ..sampler import OverlapBatchSampler

SENTIMENT_PATH = DATA_PATH.parent / "rt_snippets.jsonl.gz"

@dataclass(frozen=True)
class Arm:
    """How an arm trains. rerun: on DLB's batch (the previous step's new samples + the new ones) instead of
    the new samples only. dynamic: the `dynamic` option of its DynSDPBLoss; None: plain cross-entropy.
    passes: epochs (or steps) of the study's schedule it trains (2: twice the updates, as many sample passes
    as a re-running arm). label_smoothing: of its cross-entropy (plain CE arms only). teacher: DynSDPBLoss's
    `teacher` ("previous_visit": each sample taught by its own logits from the previous epoch, no re-run)."""

    rerun: bool
    dynamic: bool | str | None
    passes: int = 1
    label_smoothing: float = 0.0
    teacher: str = "previous_batch"
    alpha_ramp: bool = False  # PS-KD's alpha_t = alpha * t / T over the epochs t = 0..T-1 (DynSDPBLoss.set_alpha)


ARMS: dict[str, Arm] = {
    "ce": Arm(rerun=False, dynamic=None),
    "ce_rerun": Arm(rerun=True, dynamic=None),
    "dlb": Arm(rerun=True, dynamic=False),
    "dynsdpb": Arm(rerun=True, dynamic=True),
    "alpha_only": Arm(rerun=True, dynamic="alpha"),
    "tau_only": Arm(rerun=True, dynamic="tau"),
    # the compute-matched arms (docs/study_compute): plain CE for twice the epochs (the sample passes of a
    # re-running arm), CE with label smoothing 0.1 (a free regulariser), and last-visit teachers
    "ce_long": Arm(rerun=False, dynamic=None, passes=2),
    "ce_ls": Arm(rerun=False, dynamic=None, label_smoothing=0.1),
    "lastvisit": Arm(rerun=False, dynamic=True, teacher="previous_visit"),
    "lastvisit_static": Arm(rerun=False, dynamic=False, teacher="previous_visit"),
    "lastvisit_ramp": Arm(rerun=False, dynamic=False, teacher="previous_visit", alpha_ramp=True),
}
# `dynsdpb study` without --arms: the previous-batch study (docs/study, docs/study_lr1e-3)
DEFAULT_ARMS = ("ce", "ce_rerun", "dlb", "dynsdpb", "alpha_only", "tau_only")
# the compute-matched study (docs/study_compute)
COMPUTE_ARMS = ("ce", "ce_long", "ce_ls", "ce_rerun", "dlb", "dynsdpb", "lastvisit", "lastvisit_static", "lastvisit_ramp")
TASKS = ("sentiment", "gsm")

# two-sided 95% quantiles t_{0.975, df} of Student's t for df = 1..30 (standard tables; e.g. scipy.stats.t.ppf)
T_975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788,
         2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639,
         2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)  # fmt: skip


@dataclass
class TaskSpec:
    """Per-task sizes and schedule."""

    steps: int  # optimizer updates per run
    max_length: int  # tokens per example (longer examples are truncated, or dropped for sentiment)
    train_examples: int  # the first n of the task's train split
    test_examples: int  # the first n of the held-out split (the final score)
    lr: float
    curve_examples: int  # the first n held-out examples, scored curve_points times during training


@dataclass
class StudyConfig:
    """Options of the study (the CLI's flags). Defaults: the full study (46 minutes on 2 CPU cores, README)."""

    out: Path = Path("dynsdpb_study")
    model: str = "auto"  # as `dynsdpb finetune --model`; "tiny" for the CI configuration
    seeds: int = 5
    arms: tuple[str, ...] = DEFAULT_ARMS
    tasks: tuple[str, ...] = TASKS
    batch_size: int = 4  # new samples per optimizer update in every arm
    top_layers: int = 1  # decoder layers trained (with the final norm); the ones below are frozen
    alpha: float = 1.0
    tau: float = 3.0
    curve_points: int = 3  # held-out evaluations on a subset during training (the training curve)
    sentiment: TaskSpec = field(default_factory=lambda: TaskSpec(steps=80, max_length=64, train_examples=320, test_examples=1200, lr=1e-4, curve_examples=200))
    gsm: TaskSpec = field(default_factory=lambda: TaskSpec(steps=40, max_length=128, train_examples=160, test_examples=100, lr=1e-4, curve_examples=50))
    epochs: int | None = None  # passes over the train split per run (None: each task's `steps`)
    timing_steps: int = 3  # full-model steps timed per arm (0: none); see time_full_model
    threads: int | None = None  # torch.set_num_threads; None keeps torch's default (one per core)
    cache_dir: Path = FinetuneConfig.cache_dir

    @classmethod
    def tiny(cls, out: Path) -> StudyConfig:
        """The CI configuration: a small random LLaMA, 2 seeds, a few steps, small splits."""
        spec = dict(train_examples=12, test_examples=12, lr=2e-3, curve_examples=6)
        return cls(
            out=out, model="tiny", seeds=2, batch_size=2, curve_points=2, timing_steps=1,
            sentiment=TaskSpec(steps=5, max_length=256, **spec), gsm=TaskSpec(steps=4, max_length=384, **spec),
        )  # fmt: skip

    def task(self, name: str) -> TaskSpec:
        return getattr(self, name)

    def with_lr(self, lr: float) -> None:
        """One learning rate for every task (a different study: its runs need their own --out)."""
        if not (isinstance(lr, float) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
        for name in TASKS:
            self.task(name).lr = lr

    def identity(self) -> dict:
        """What a stored run must agree with to be reused (everything but out and the number of seeds)."""
        skipped = ("out", "seeds", "arms", "tasks", "threads", "cache_dir", "timing_steps")
        identity = {k: str(v) for k, v in asdict(self).items() if k not in skipped}
        if self.epochs is None:  # as before the option existed: the earlier studies' runs stay readable
            del identity["epochs"]
        return identity

    def steps(self, task: str, n_train: int, arm: str) -> int:
        """Optimizer updates of one run of `arm`: the task's steps, or epochs x steps per epoch (one step per
        batch_size new samples, the last one smaller); times the arm's passes."""
        per_pass = self.task(task).steps if self.epochs is None else self.epochs * math.ceil(n_train / self.batch_size)
        return per_pass * ARMS[arm].passes


def check_config(config: StudyConfig) -> None:
    """Clear errors for options the study cannot run."""
    unknown_arms = [a for a in config.arms if a not in ARMS]
    if unknown_arms:
        raise ValueError(f"arms must be among {list(ARMS)}, got {unknown_arms}")
    unknown_tasks = [t for t in config.tasks if t not in TASKS]
    if unknown_tasks:
        raise ValueError(f"tasks must be among {list(TASKS)}, got {unknown_tasks}")
    counts = [("seeds", config.seeds), ("batch_size", config.batch_size), ("top_layers", config.top_layers)]
    optional = [(name, getattr(config, name)) for name in ("threads", "epochs") if getattr(config, name) is not None]
    for name, value in counts + optional:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(config.timing_steps, int) or config.timing_steps < 0:
        raise ValueError(f"timing_steps must be an int >= 0, got {config.timing_steps!r}")


# -- statistics --------------------------------------------------------------------------------------


def t_quantile_975(df: int) -> float:
    """t_{0.975, df}: the table above for df <= 30, else the Cornish-Fisher expansion around z = 1.95996
    (error < 1e-4 for df > 30)."""
    if df < 1:
        return math.nan
    if df <= len(T_975):
        return T_975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_std_ci(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation and the 95% t confidence interval of the mean of `values`.

    ci = mean +- t_{0.975, n-1} * std / sqrt(n); std and ci are NaN for n < 2."""
    n = len(values)
    mean = sum(values) / n if n else math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    half = t_quantile_975(n - 1) * std / math.sqrt(n) if n > 1 else math.nan
    return {"n": n, "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half}


# -- data -----------------------------------------------------------------------------------------------


@dataclass
class Example:
    """A tokenized example: input_ids (T,), and the positions whose next token is a target with that token."""

    input_ids: torch.Tensor
    target_positions: torch.Tensor
    target_tokens: torch.Tensor


def _read_jsonl(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def label_tokens(encode) -> tuple[str, dict[str, int]]:
    """(prompt ending, {label: token}): the first token of " positive" / " negative" after "Sentiment:"
    (a BPE tokenizer), or of "positive" / "negative" after "Sentiment: " when those first tokens are the
    same (the byte tokenizer's space)."""
    for ending, prefix in ((":", " "), (": ", "")):
        tokens = {label: encode(prefix + label)[0] for label in ("positive", "negative")}
        if tokens["positive"] != tokens["negative"]:
            return ending, tokens
    raise ValueError("the tokenizer gives 'positive' and 'negative' the same first token")


def sentiment_examples(records: list[dict], encode, max_length: int) -> list[Example]:
    """'Review: <text>\\nSentiment:' -> the label word's first token; examples over max_length are dropped."""
    ending, tokens = label_tokens(encode)
    examples = []
    for record in records:
        prompt = encode(f"Review: {record['text']}\nSentiment{ending}")
        if len(prompt) + 1 > max_length:
            continue
        ids = torch.tensor(prompt + [tokens[record["label"]]])
        examples.append(Example(ids, torch.tensor([len(prompt) - 1]), torch.tensor([tokens[record["label"]]])))
    return examples


def gsm_examples(records: list[dict], encode, eos_id: int, max_length: int) -> list[Example]:
    """The worked solution given the question (finetune.tokenize), truncated to max_length tokens."""
    examples = []
    for record in records:
        item = tokenize(record, encode, eos_id, max_length)
        next_labels = item["labels"][1:]
        positions = (next_labels != IGNORE_INDEX).nonzero().squeeze(1)
        if len(positions):
            examples.append(Example(item["input_ids"], positions, next_labels[positions]))
    return examples


def task_examples(name: str, spec: TaskSpec, loaded) -> tuple[list[Example], list[Example]]:
    """(train, held-out) examples of task `name`."""
    if name == "sentiment":
        records = _read_jsonl(SENTIMENT_PATH)
        splits = {s: [r for r in records if r["split"] == s] for s in ("train", "test")}
        make = lambda rs: sentiment_examples(rs, loaded.encode, spec.max_length)  # noqa: E731
    else:
        splits = load_examples(DATA_PATH)
        make = lambda rs: gsm_examples(rs, loaded.encode, loaded.eos_id, spec.max_length)  # noqa: E731
    return make(splits["train"])[: spec.train_examples], make(splits["test"])[: spec.test_examples]


# -- the split model: frozen lower layers (computed once), trained top layers -----------------------------


def run_layers(decoder, layers, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """hidden (B, T, H) through `layers` of the LlamaModel `decoder`, right padding masked as LlamaModel does."""
    from transformers.masking_utils import create_causal_mask

    position_ids = torch.arange(hidden.shape[1], device=hidden.device)[None]
    mask = create_causal_mask(
        config=decoder.config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None, position_ids=position_ids
    )
    position_embeddings = decoder.rotary_emb(hidden, position_ids=position_ids)
    for layer in layers:
        hidden = layer(hidden, attention_mask=mask, position_embeddings=position_embeddings, position_ids=position_ids)
    return hidden


def _pad_ids(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id)
    mask = torch.zeros(len(examples), length, dtype=torch.long)
    for row, example in enumerate(examples):
        ids[row, : len(example.input_ids)] = example.input_ids
        mask[row, : len(example.input_ids)] = 1
    return ids, mask


@torch.no_grad()
def frozen_features(model, examples: list[Example], n_frozen: int, pad_id: int, batch: int = 16) -> torch.Tensor:
    """(N, T_max, H) output of the first n_frozen decoder layers for each example, zero after its length."""
    decoder = model.model
    length = max(len(e.input_ids) for e in examples)
    out = torch.zeros(len(examples), length, model.config.hidden_size)
    by_length = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))  # little padding
    for start in range(0, len(examples), batch):
        chosen = by_length[start : start + batch]
        ids, mask = _pad_ids([examples[i] for i in chosen], pad_id)
        hidden = run_layers(decoder, decoder.layers[:n_frozen], decoder.embed_tokens(ids), mask)
        out[chosen, : ids.shape[1]] = hidden * mask[..., None]
    return out


def cached_features(model, examples: list[Example], n_frozen: int, pad_id: int, description: str, cache: Path | None) -> torch.Tensor:
    """frozen_features, stored under `cache` keyed by the model, the layer count and the token ids."""
    if cache is None:
        return frozen_features(model, examples, n_frozen, pad_id)
    digest = hashlib.sha256(f"{description}|{n_frozen}|{pad_id}".encode())
    for example in examples:
        digest.update(example.input_ids.numpy().tobytes() + b"|")
    path = cache / f"features-{digest.hexdigest()[:20]}.pt"
    if path.is_file():
        return torch.load(path)
    features = frozen_features(model, examples, n_frozen, pad_id)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(features, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)
    return features


class TopModel(torch.nn.Module):
    """The trained part: the top decoder layers and the final norm; the LM head weight is frozen.

    forward(features (B, T, H), attention_mask (B, T), positions (B, K)) -> logits (B, K, V) at the
    given positions only (the rows a loss or a score needs)."""

    def __init__(self, model, n_frozen: int) -> None:
        super().__init__()
        # a tuple, so that neither the whole decoder (used for its config and rotary embedding) nor the
        # frozen head weight become part of this module's parameters and state_dict
        self.frozen = (model.model, model.get_output_embeddings().weight.detach())
        self.layers = model.model.layers[n_frozen : model.config.num_hidden_layers]
        self.norm = model.model.norm

    @property
    def head_weight(self) -> torch.Tensor:
        return self.frozen[1]

    def trainable(self) -> list[torch.nn.Parameter]:
        return [*self.layers.parameters(), *self.norm.parameters()]

    def forward(self, features: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.norm(run_layers(self.frozen[0], self.layers, features, attention_mask))
        picked = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
        return picked @ self.head_weight.T


def batch_tensors(examples: list[Example], ids: list[int], features: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(features (B, T, H), attention mask (B, T), target positions (B, K), labels (B, K)) of examples `ids`,
    padded to the batch's longest example and most targets (labels ignore_index there)."""
    chosen = [examples[i] for i in ids]
    length = max(len(e.input_ids) for e in chosen)
    mask = torch.zeros(len(ids), length, dtype=torch.long)
    for row, e in enumerate(chosen):
        mask[row, : len(e.input_ids)] = 1
    return features[ids, :length], mask, *target_tensors(chosen)


def target_tensors(chosen: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """(target positions (B, K), labels (B, K)) of `chosen`, padded to the most targets (labels ignore_index there)."""
    k = max(len(e.target_positions) for e in chosen)
    positions = torch.zeros(len(chosen), k, dtype=torch.long)
    labels = torch.full((len(chosen), k), IGNORE_INDEX)
    for row, e in enumerate(chosen):
        positions[row, : len(e.target_positions)] = e.target_positions
        labels[row, : len(e.target_tokens)] = e.target_tokens
    return positions, labels


@torch.no_grad()
def evaluate(top: TopModel, task: str, examples: list[Example], features: torch.Tensor, tokens: dict[str, int] | None, batch: int = 32) -> dict[str, float]:
    """Held-out scores: mean CE and next-token accuracy over all targets; for "sentiment" also the two-way
    accuracy (the right label word scores above the other). "metric" names the headline value."""
    top.eval()
    loss_sum, correct, two_way, count = 0.0, 0, 0, 0
    for start in range(0, len(examples), batch):
        ids = list(range(start, min(start + batch, len(examples))))
        feats, mask, positions, labels = batch_tensors(examples, ids, features)
        logits = top(feats, mask, positions)
        valid = labels != IGNORE_INDEX
        rows, targets = logits[valid], labels[valid]
        loss_sum += float(F.cross_entropy(rows, targets, reduction="sum"))
        correct += int((rows.argmax(-1) == targets).sum())
        if tokens is not None:
            pos, neg = tokens["positive"], tokens["negative"]
            predicted = torch.where(rows[:, pos] > rows[:, neg], pos, neg)
            two_way += int((predicted == targets).sum())
        count += int(valid.sum())
    top.train()
    scores = {"loss": loss_sum / count, "token_accuracy": correct / count}
    if tokens is not None:
        scores["accuracy"] = scores.pop("token_accuracy")
        scores["two_way_accuracy"] = two_way / count
    return scores


def headline(task: str) -> str:
    return "accuracy" if task == "sentiment" else "token_accuracy"


# -- one run ----------------------------------------------------------------------------------------------


def step_batches(n_train: int, batch_size: int, steps: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """(DLB batch, its new samples) of each step, from OverlapBatchSampler's stream for `seed`: the new
    samples are the batch without the previous step's new samples, so every arm sees the same ones."""
    sampler = OverlapBatchSampler(n_train, batch_size, seed=seed)
    out: list[tuple[list[int], list[int]]] = []
    previous_new: list[int] = []
    while len(out) < steps:
        for batch in sampler:  # one epoch per pass
            if out and batch[: len(previous_new)] != previous_new:
                raise RuntimeError("OverlapBatchSampler's batch does not start with the previous new samples")
            new = batch[len(previous_new) :] if out else batch
            out.append((batch, new))
            previous_new = new
            if len(out) == steps:
                break
    return out


def make_loss(arm: str, vocab_size: int, config: StudyConfig, max_rows: int) -> DynSDPBLoss | None:
    """The arm's DynSDPBLoss (None for the plain-CE arms). A previous-batch ring has room for two steps' new
    samples (no evictions); a previous-visit ring grows to the whole train split (top-k teachers, k = 64)."""
    spec = ARMS[arm]
    if spec.dynamic is None:
        return None
    capacity = 4 * config.batch_size * max_rows if spec.teacher == "previous_batch" else None
    return DynSDPBLoss(
        vocab_size, alpha=config.alpha, tau=config.tau, dynamic=spec.dynamic, shift_labels=False,
        capacity_rows=capacity, teacher=spec.teacher,
    )  # fmt: skip


def arm_loss(arm: str, loss_fn: DynSDPBLoss | None, logits: torch.Tensor, labels: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """The arm's training loss of one batch: (label-smoothed) CE, or DynSDPBLoss keyed by the sample ids."""
    if loss_fn is None:
        smoothing = ARMS[arm].label_smoothing
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, label_smoothing=smoothing)
    return loss_fn(logits, labels, torch.tensor(ids))


def train_run(task: str, arm: str, seed: int, top: TopModel, initial: dict, data: dict, config: StudyConfig, progress=None) -> dict:
    """Train `arm` from the initial weights; returns the run record (scores, curves, cost, wall time)."""
    spec = config.task(task)
    train, test, train_features, test_features, tokens = (data[k] for k in ("train", "test", "train_features", "test_features", "tokens"))
    top.load_state_dict(initial)
    top.train()
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(top.trainable(), lr=spec.lr, weight_decay=0.0)
    loss_fn = make_loss(arm, top.head_weight.shape[0], config, max(len(e.target_positions) for e in train))
    steps = config.steps(task, len(train), arm)
    curve_at = {round(steps * (i + 1) / config.curve_points) for i in range(config.curve_points)} if config.curve_points else set()
    curve_examples = test[: spec.curve_examples]
    record = {"task": task, "arm": arm, "seed": seed, "train_ce": [], "train_loss": [], "curve": [],
              "teacher_samples": 0, "teacher_misses": 0, "sample_passes": 0}  # fmt: skip
    train_seconds = 0.0
    seen: set[int] = set()  # samples visited so far (a previous-visit teacher exists for each)
    previous_new: list[int] = []
    cpu_started = time.process_time()  # CPU time of all threads: the cost, whatever else shares the machine
    per_epoch = math.ceil(len(train) / config.batch_size)
    for step, (batch, new) in enumerate(step_batches(len(train), config.batch_size, steps, seed), start=1):
        started = time.perf_counter()
        if ARMS[arm].alpha_ramp:  # epoch t = 0..T-1 of T: alpha * t / T (0 in the first, which has no teachers)
            loss_fn.set_alpha(config.alpha * ((step - 1) // per_epoch) / math.ceil(steps / per_epoch))
        ids = batch if ARMS[arm].rerun else new
        feats, mask, positions, labels = batch_tensors(train, ids, train_features)
        logits = top(feats, mask, positions)
        loss = arm_loss(arm, loss_fn, logits, labels, ids)
        if loss_fn is None and not ARMS[arm].label_smoothing:
            ce = float(loss.detach())  # the loss is the CE
        elif loss_fn is None:  # label-smoothed: the plain CE of the same logits, for the training curve
            ce = float(F.cross_entropy(logits.detach().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX))
        else:
            stats = loss_fn.last_stats
            ce = float(stats.loss.ce)
            record["teacher_samples"] += int(stats.teacher_samples)
            # a teacher is expected for each sample of the previous step's new ones (previous batch) or
            # for each sample visited before (previous visit)
            expected = previous_new if ARMS[arm].teacher == "previous_batch" else [i for i in ids if i in seen]
            record["teacher_misses"] += len(set(expected) & set(ids)) - int(stats.teacher_samples)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        train_seconds += time.perf_counter() - started
        seen.update(ids)
        previous_new = new
        record["sample_passes"] += len(ids)
        record["train_ce"].append(ce)
        record["train_loss"].append(float(loss.detach()))
        if step in curve_at:
            scores = evaluate(top, task, curve_examples, test_features, tokens)
            record["curve"].append({"step": step, **scores})
        if progress is not None:
            progress.set_postfix_str(f"{task}/{arm}/seed{seed} step {step}/{steps} ce {ce:.3f}")
    record["cpu_s"] = time.process_time() - cpu_started  # includes the curve evaluations
    record["updates"] = steps
    started = time.perf_counter()
    record["heldout"] = evaluate(top, task, test, test_features, tokens)
    record["eval_s"] = time.perf_counter() - started
    record["wall_s"] = train_seconds
    record["metric"] = headline(task)
    record["value"] = record["heldout"][record["metric"]]
    return record


def time_full_model(loaded, task: str, train: list[Example], arms: tuple[str, ...], config: StudyConfig) -> dict:
    """Seconds per optimizer update of each arm when the whole model is fine-tuned (every parameter but the
    tied embedding trained, the full forward and backward from the token ids), so that a run's cost in full
    fine-tuning is updates x this. Median of config.timing_steps timed steps of seed 0's stream, after one
    untimed step; a previous-visit arm first visits the timed batches once, untimed, so the timed steps
    read teachers. The model's weights are restored afterwards."""
    import statistics

    model = loaded.model
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    head = model.get_output_embeddings().weight
    trained = [p for p in model.parameters() if p is not head]
    n = config.timing_steps
    out: dict = {"steps_timed": n, "threads": torch.get_num_threads(), "arms": {}}
    max_rows = max(len(e.target_positions) for e in train)
    try:
        for parameter in trained:
            parameter.requires_grad_(True)
        for arm in arms:
            optimizer = torch.optim.AdamW(trained, lr=1e-6, weight_decay=0.0)
            loss_fn = make_loss(arm, head.shape[0], config, max_rows)
            stream = step_batches(len(train), config.batch_size, n + 2, seed=0)
            batches = [(b if ARMS[arm].rerun else new) for b, new in stream]

            def step(ids: list[int]) -> float:
                started = time.perf_counter()
                chosen = [train[i] for i in ids]
                input_ids, attention = _pad_ids(chosen, loaded.pad_id)
                positions, labels = target_tensors(chosen)
                hidden = model.model(input_ids=input_ids, attention_mask=attention).last_hidden_state
                picked = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
                loss = arm_loss(arm, loss_fn, picked @ head.T, labels, ids)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                return time.perf_counter() - started

            warm = batches[:2] if ARMS[arm].teacher == "previous_batch" else batches[:1] + batches[2:]
            for ids in warm:  # untimed: the first step, and a previous-visit arm's first visit
                step(ids)
            seconds = [step(ids) for ids in batches[2:]]
            out["arms"][arm] = {"s_per_update": statistics.median(seconds), "samples_per_update": len(batches[2]),
                                "teacher_samples_last": int(loss_fn.last_stats.teacher_samples) if loss_fn is not None else 0,
                                "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}  # fmt: skip
    finally:
        for parameter, flag in zip(model.parameters(), flags):
            parameter.requires_grad_(flag)
        model.load_state_dict(saved)
    out["task"] = task
    out["model"] = loaded.description
    out["machine"] = machine()
    out["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return out


def _write_json(path: Path, payload: dict) -> None:
    """Atomically: a killed run never leaves a half-written result behind."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def _claim(path: Path) -> bool:
    """Claim the run stored at `path` for this process (PATH.claim holds its pid), so that several
    `dynsdpb study` workers can share one --out folder; a claim whose process is gone is taken over."""
    claim = path.with_suffix(".claim")
    for _ in range(2):
        try:
            descriptor = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                os.kill(int(claim.read_text() or 0), 0)
                return False  # its owner is alive
            except (ProcessLookupError, ValueError, FileNotFoundError):
                claim.unlink(missing_ok=True)  # stale: its owner was killed
                continue
        with os.fdopen(descriptor, "w") as handle:
            handle.write(str(os.getpid()))
        return True
    return False


def machine() -> dict:
    """Where the study ran: CPU model, ISA level torch uses, threads, versions."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "isa": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}  # fmt: skip


def run_study(config: StudyConfig) -> dict:
    """Run every missing (task, arm, seed), then write results.csv, summary.json/.txt/.md and the plots; returns the summary."""
    from tqdm.auto import tqdm

    check_config(config)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    runs_dir = config.out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    identity = config.identity()
    torch.manual_seed(0)
    loaded = load_model(FinetuneConfig(model=config.model, seed=0, cache_dir=config.cache_dir))
    model = loaded.model
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    n_layers = model.config.num_hidden_layers
    if config.top_layers > n_layers:
        raise ValueError(f"top_layers must be <= the model's {n_layers} decoder layers, got {config.top_layers}")
    n_frozen = n_layers - config.top_layers
    top = TopModel(model, n_frozen)
    for parameter in top.trainable():
        parameter.requires_grad_(True)
    initial = {k: v.clone() for k, v in top.state_dict().items()}
    cache = config.cache_dir / "study" if loaded.pretrained else None
    # seed-major within a task: a study stopped early still has every arm of its first seeds (paired)
    grid = [(t, a, s) for t in config.tasks for s in range(config.seeds) for a in config.arms]
    todo = [g for g in grid if not (runs_dir / f"{g[0]}-{g[1]}-seed{g[2]}.json").is_file()]
    for task, arm, seed in sorted(set(grid) - set(todo)):  # resumed: the stored runs must be this study's
        stored = json.loads((runs_dir / f"{task}-{arm}-seed{seed}.json").read_text())
        if stored.get("identity") != identity:
            raise ValueError(f"{runs_dir} holds runs of another configuration ({task}-{arm}-seed{seed}); use another --out")
    print(f"dynsdpb study: {loaded.description}; {len(grid) - len(todo)} of {len(grid)} runs stored in {runs_dir}", file=sys.stderr)
    progress = tqdm(total=len(grid), initial=len(grid) - len(todo), desc="study runs", file=sys.stderr, mininterval=5)
    for task in config.tasks:
        task_todo = [g for g in todo if g[0] == task]
        start_path = runs_dir / f"{task}-start.json"
        if not task_todo and start_path.is_file():
            continue
        spec = config.task(task)
        train, test = task_examples(task, spec, loaded)
        started = time.perf_counter()
        data = {
            "train": train,
            "test": test,
            "train_features": cached_features(model, train, n_frozen, loaded.pad_id, loaded.description, cache),
            "test_features": cached_features(model, test, n_frozen, loaded.pad_id, loaded.description, cache),
            "tokens": label_tokens(loaded.encode)[1] if task == "sentiment" else None,
        }
        features_s = time.perf_counter() - started  # about 0 when read back from the cache
        if not start_path.is_file():
            top.load_state_dict(initial)
            scores = evaluate(top, task, test, data["test_features"], data["tokens"])
            _write_json(start_path, {"task": task, "heldout": scores, "train_examples": len(train), "test_examples": len(test),
                                     "features_s": features_s, "identity": identity})  # fmt: skip
        timing_path = config.out / f"timing-{task}.json"
        timing = json.loads(timing_path.read_text()) if timing_path.is_file() else None
        if timing is not None and timing.get("identity") != identity:
            raise ValueError(f"{timing_path} was measured for another configuration; use another --out")
        missing = tuple(a for a in config.arms if timing is None or a not in timing["arms"])
        if config.timing_steps and missing:
            measured = time_full_model(loaded, task, train, missing, config)
            if timing is not None:
                measured["arms"] = {**timing["arms"], **measured["arms"]}
            _write_json(timing_path, {**measured, "identity": identity})
        for _, arm, seed in task_todo:
            path = runs_dir / f"{task}-{arm}-seed{seed}.json"
            if path.is_file() or not _claim(path):  # done or being done by another worker on this folder
                continue
            record = train_run(task, arm, seed, top, initial, data, config, progress)
            record.update(identity=identity, model=loaded.description, machine=machine(),
                          date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))  # fmt: skip
            _write_json(path, record)
            path.with_suffix(".claim").unlink()
            progress.update(1)
    progress.close()
    return summarize(config, loaded.description)


# -- aggregation ---------------------------------------------------------------------------------------------


# baseline arm -> which arms are compared with it (paired differences with 95% CIs in the summary): every
# arm with ce; every other arm with ce_long (plain CE at the sample passes of a re-running arm); the
# distilling arms with ce_rerun (what distillation adds to the re-run); the dynamic arms with dlb (what the
# dynamic rule adds to DLB's constant alpha and tau)
BASELINES = {
    "ce": lambda arm: True,
    "ce_long": lambda arm: arm != "ce",
    "ce_rerun": lambda arm: ARMS[arm].dynamic is not None,
    "dlb": lambda arm: ARMS[arm].dynamic not in (None, False) and ARMS[arm].teacher == "previous_batch",
}

CSV_COLUMNS = ["task", "arm", "seed", "metric", "value", "wall_s", "cpu_s", "heldout_loss", "two_way_accuracy", "eval_s", "steps",
               "sample_passes", "final_train_ce", "mean_distill_term"]  # fmt: skip


def mean_distill_term(run: dict) -> float:
    """Mean over steps of the loss minus its CE part: the distillation term as trained (0 for the CE arms,
    whose loss minus CE is label smoothing's term in ce_ls)."""
    if ARMS[run["arm"]].dynamic is None:
        return 0.0
    return sum(loss - ce for loss, ce in zip(run["train_loss"], run["train_ce"])) / len(run["train_ce"])


def summarize(config: StudyConfig, description: str | None = None) -> dict:
    """results.csv, summary.json/.txt/.md and the plots from the stored runs of this configuration (those that
    exist: a study stopped early is summarized over the runs it finished)."""
    runs_dir = config.out / "runs"
    paths = [runs_dir / f"{t}-{a}-seed{s}.json" for t in config.tasks for a in config.arms for s in range(config.seeds)]
    runs = [json.loads(path.read_text()) for path in paths if path.is_file()]
    if not runs:
        raise ValueError(f"no stored runs of this study in {runs_dir}")
    if any(run["identity"] != config.identity() for run in runs):
        raise ValueError(f"{runs_dir} holds runs of another configuration; summarize with the options that made them")
    description = description or runs[0]["model"]
    with open(config.out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for run in runs:
            writer.writerow({
                "task": run["task"], "arm": run["arm"], "seed": run["seed"], "metric": run["metric"],
                "value": f"{run['value']:.6f}", "wall_s": f"{run['wall_s']:.3f}", "cpu_s": f"{run['cpu_s']:.3f}",
                "heldout_loss": f"{run['heldout']['loss']:.6f}",
                "two_way_accuracy": f"{run['heldout']['two_way_accuracy']:.6f}" if "two_way_accuracy" in run["heldout"] else "",
                "eval_s": f"{run['eval_s']:.3f}", "steps": len(run["train_ce"]), "sample_passes": run.get("sample_passes", ""),
                "final_train_ce": f"{sum(run['train_ce'][-10:]) / len(run['train_ce'][-10:]):.6f}",
                "mean_distill_term": f"{mean_distill_term(run):.3e}",
            })  # fmt: skip
    summary: dict = {"model": description, "config": {k: str(v) for k, v in asdict(config).items()}, "machine": runs[0]["machine"] if runs else machine(), "tasks": {}}
    for task in config.tasks:
        by_arm = {a: sorted((r for r in runs if r["task"] == task and r["arm"] == a), key=lambda r: r["seed"]) for a in config.arms}
        by_arm = {a: arm_runs for a, arm_runs in by_arm.items() if arm_runs}
        if not by_arm:
            continue
        start = json.loads((runs_dir / f"{task}-start.json").read_text())
        timing_path = config.out / f"timing-{task}.json"
        timing = json.loads(timing_path.read_text()) if timing_path.is_file() else None
        entry: dict = {"metric": headline(task), "heldout_start": start["heldout"], "train_examples": start["train_examples"],
                       "test_examples": start["test_examples"], "arms": {}, "timing": timing}  # fmt: skip
        for arm, arm_runs in by_arm.items():
            values = [r["value"] for r in arm_runs]
            stats = {"value": mean_std_ci(values), "heldout_loss": mean_std_ci([r["heldout"]["loss"] for r in arm_runs]),
                     "wall_s": mean_std_ci([r["wall_s"] for r in arm_runs]), "cpu_s": mean_std_ci([r["cpu_s"] for r in arm_runs])}  # fmt: skip
            stats["distill_term"] = mean_std_ci([mean_distill_term(r) for r in arm_runs])
            stats["updates"] = len(arm_runs[0]["train_ce"])
            stats["sample_passes"] = arm_runs[0].get("sample_passes")
            if timing is not None and arm in timing["arms"]:  # full fine-tuning: updates x measured s/update
                stats["full_model_s"] = timing["arms"][arm]["s_per_update"] * stats["updates"]
            for baseline in BASELINES:  # paired over the seeds both arms have
                if baseline not in by_arm or not BASELINES[baseline](arm) or arm == baseline:
                    continue
                base = {r["seed"]: r for r in by_arm[baseline]}
                paired = [r for r in arm_runs if r["seed"] in base]
                stats[f"diff_to_{baseline}"] = mean_std_ci([r["value"] - base[r["seed"]]["value"] for r in paired])
                stats[f"loss_diff_to_{baseline}"] = mean_std_ci([r["heldout"]["loss"] - base[r["seed"]]["heldout"]["loss"] for r in paired])
            entry["arms"][arm] = stats
        summary["tasks"][task] = entry
    _write_json(config.out / "summary.json", summary)
    text = format_summary(summary)
    (config.out / "summary.txt").write_text(text + "\n")
    (config.out / "summary.md").write_text(format_markdown(summary))
    print(text)
    plot_results(runs, summary, config.out)
    return summary


def _interval(stats: dict | None, digits: int = 4) -> str:
    """'+mean [low, high]' of a mean_std_ci result, '' when absent."""
    if not stats:
        return ""
    return f"{stats['mean']:+.{digits}f} [{stats['ci_low']:+.{digits}f}, {stats['ci_high']:+.{digits}f}]"


def _baselines(entry: dict) -> list[str]:
    """The BASELINES that some arm of this task was compared with (the summary's difference columns)."""
    return [b for b in BASELINES if any(f"diff_to_{b}" in stats for stats in entry["arms"].values())]


def _cost_cells(stats: dict) -> list[str]:
    """updates, sample passes (forward/backward passes over a sample), CPU s of the trained top layers, and
    the full fine-tuning estimate (updates x measured s/update; '-' when not timed)."""
    full = stats.get("full_model_s")
    return [str(stats["updates"]), str(stats.get("sample_passes") or "-"), f"{stats['cpu_s']['mean']:.1f}", f"{full:.3g}" if full is not None else "-"]


def format_summary(summary: dict) -> str:
    """The printed summary: per task and arm, the held-out metric, its paired differences with 95% CIs to
    each baseline arm present (BASELINES), the held-out loss, the mean distillation term and the cost."""
    lines = [f"model: {summary['model']}"]
    for task, entry in summary["tasks"].items():
        start = entry["heldout_start"][entry["metric"]]
        baselines = _baselines(entry)
        lines.append(f"\n{task}: held-out {entry['metric']} ({entry['test_examples']} examples; {start:.4f} before training)")
        header = f"{'arm':>16} {'n':>2} {'mean':>7} {'std':>7} " + " ".join(f"{'diff to ' + b + ' [95% CI]':>27}" for b in baselines)
        lines.append(header + f" {'loss':>7} {'distill':>8} {'updates':>7} {'passes':>6} {'CPU s':>7} {'full s':>7}")
        for arm, stats in entry["arms"].items():
            cells = " ".join(f"{_interval(stats.get(f'diff_to_{b}')):>27}" for b in baselines)
            updates, passes, cpu, full = _cost_cells(stats)
            lines.append(
                f"{arm:>16} {stats['value']['n']:>2} {stats['value']['mean']:>7.4f} {stats['value']['std']:>7.4f} {cells} "
                f"{stats['heldout_loss']['mean']:>7.4f} {stats['distill_term']['mean']:>8.1e} {updates:>7} {passes:>6} {cpu:>7} {full:>7}"
            )  # fmt: skip
    return "\n".join(lines)


def format_markdown(summary: dict) -> str:
    """The summary as one Markdown table per task (the README's tables are this text)."""
    lines = []
    for task, entry in summary["tasks"].items():
        metric = entry["metric"]
        start = entry["heldout_start"][metric]
        baselines = _baselines(entry)
        header = [
            "arm", "seeds", f"{metric}: mean ± std", *(f"difference to {b} [95% CI]" for b in baselines), "held-out loss",
            *(f"loss difference to {b} [95% CI]" for b in baselines), "distillation term", "updates", "sample passes",
            "CPU s/run", "full fine-tuning s/run",
        ]  # fmt: skip
        lines += [
            f"**{task}** (held-out {metric} on {entry['test_examples']} examples; {start:.4f} before training):", "",
            "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
        ]  # fmt: skip
        for arm, stats in entry["arms"].items():
            value = stats["value"]
            cells = [
                arm, str(value["n"]), f"{value['mean']:.4f} ± {value['std']:.4f}",
                *(_interval(stats.get(f"diff_to_{b}")) or "-" for b in baselines),
                f"{stats['heldout_loss']['mean']:.4f}",
                *(_interval(stats.get(f"loss_diff_to_{b}")) or "-" for b in baselines),
                f"{stats['distill_term']['mean']:.1e}", *_cost_cells(stats),
            ]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_cost(plt, task: str, entry: dict, out: Path) -> None:
    """OUT/<task>_cost.png: the held-out metric (mean over seeds, 95% CI as error bars) of each arm against its
    cost: full fine-tuning seconds per run where measured, else sample passes per run."""
    arms = entry["arms"]
    timed = all("full_model_s" in stats for stats in arms.values())
    figure, axis = plt.subplots(figsize=(6, 4))
    for arm, stats in arms.items():
        x = stats["full_model_s"] if timed else (stats.get("sample_passes") or stats["updates"])
        value = stats["value"]
        error = [[value["mean"] - value["ci_low"]], [value["ci_high"] - value["mean"]]] if value["n"] > 1 else None
        axis.errorbar([x], [value["mean"]], yerr=error, fmt="o", capsize=3, label=arm)
        axis.annotate(arm, (x, value["mean"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    axis.set_xlabel("full fine-tuning seconds per run (updates x measured s/update)" if timed else "sample passes per run")
    _save_figure(plt, figure, axis, f"held-out {entry['metric']}", f"{task}: metric against cost (mean over seeds, 95% CI)", out / f"{task}_cost.png", 7)


def _save_figure(plt, figure, axis, ylabel: str, title: str, path: Path, legend_size: int) -> None:
    """Label the axis, add its legend, and write the figure to `path` (120 dpi)."""
    axis.set_ylabel(ylabel)
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=legend_size)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_results(runs: list[dict], summary: dict, out: Path) -> None:
    """OUT/<task>.png: held-out metric per arm, a dot per seed, the mean with its 95% CI; OUT/curves.png:
    held-out metric on the curve subset and training CE against the step, mean over seeds per arm."""
    from .benchmark import import_pyplot

    plt = import_pyplot()
    if plt is None:
        return
    for task, entry in summary["tasks"].items():
        arms = list(entry["arms"])
        figure, axis = plt.subplots(figsize=(6, 3.5))
        for x, arm in enumerate(arms):
            values = [r["value"] for r in runs if r["task"] == task and r["arm"] == arm]
            axis.scatter([x + 0.08 * (i - (len(values) - 1) / 2) for i in range(len(values))], values, s=14, alpha=0.7)
            stats = entry["arms"][arm]["value"]
            if stats["n"] > 1:
                axis.errorbar([x + 0.3], [stats["mean"]], yerr=[[stats["mean"] - stats["ci_low"]], [stats["ci_high"] - stats["mean"]]], fmt="k_", capsize=3)
        axis.axhline(entry["heldout_start"][entry["metric"]], color="grey", linestyle=":", linewidth=0.8, label="before training")
        axis.set_xticks(range(len(arms)), arms, rotation=30, fontsize=7)
        _save_figure(plt, figure, axis, f"held-out {entry['metric']}", f"{task}: a dot per seed, mean and 95% CI (black)", out / f"{task}.png", 8)
        plot_cost(plt, task, entry, out)
    tasks = list(summary["tasks"])
    figure, axes = plt.subplots(2, len(tasks), figsize=(5 * len(tasks), 6), squeeze=False)
    for column, task in enumerate(tasks):
        metric = summary["tasks"][task]["metric"]
        for arm in summary["tasks"][task]["arms"]:
            arm_runs = [r for r in runs if r["task"] == task and r["arm"] == arm]
            steps = [p["step"] for p in arm_runs[0]["curve"]]
            axes[0][column].plot(steps, [sum(r["curve"][i][metric] for r in arm_runs) / len(arm_runs) for i in range(len(steps))], marker="o", label=arm)
            ce = [sum(r["train_ce"][i] for r in arm_runs) / len(arm_runs) for i in range(len(arm_runs[0]["train_ce"]))]
            window = max(1, len(ce) // 10)  # moving average over a tenth of the run
            smooth = [sum(ce[max(0, i - window + 1) : i + 1]) / len(ce[max(0, i - window + 1) : i + 1]) for i in range(len(ce))]
            axes[1][column].plot(range(1, len(ce) + 1), smooth, label=arm)
        axes[0][column].set_title(f"{task}: held-out {metric} (a subset, mean over seeds)", fontsize=9)
        axes[1][column].set_title(f"{task}: training CE of each arm's batch (ce: new samples; others: previous + new)", fontsize=8)
        axes[1][column].set_xlabel("optimizer step")
        axes[0][column].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "curves.png", dpi=120)
    plt.close(figure)
