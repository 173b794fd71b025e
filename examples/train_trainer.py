"""DynSDPB with the Hugging Face Trainer (or TRL's SFTTrainer) under a launcher, on a tiny random LLaMA.

One process:   python examples/train_trainer.py --out run
DDP:           torchrun --standalone --nproc_per_node 2 examples/train_trainer.py --out run
               accelerate launch --config_file examples/accelerate_ddp.yaml examples/train_trainer.py --out run

The model is a LlamaForCausalLM built from a config (random weights, nothing downloaded) over the byte
tokenizer's vocabulary; the data are short arithmetic progressions of tokens (learnable, so the model's
predictions sharpen and the teachers of the previous step differ from the students of this one).

Every process writes OUT/rank{R}.json with, for every micro-batch (one per training call of the loss):
the optimizer step, its sample ids and tensors (input_ids, attention_mask, labels), num_items_in_batch,
the loss the Trainer back-propagated, and the loss module's last_stats (ce, kl, teacher_samples,
n_valid, n_distilled); and the Trainer's logged entries (log_history). With --save-weights, process 0
also writes OUT/weights_step{S}.pt, the full parameters at the start of each optimizer step S (and
after the last one), so that a test can replay every rank's stream in one process.
"""

from __future__ import annotations

import argparse
import functools
import json
import os

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, TrainingArguments

from dynsdpb_kernels.integrations.transformers import DynSDPBTrainer
from dynsdpb_kernels.tools.finetune import hf_byte_tokenizer, pad_batch

N_SAMPLES, HIDDEN, LAYERS, SEED = 64, 32, 1, 0


def make_model(vocab_size: int) -> LlamaForCausalLM:
    """The tiny random LLaMA every process (and a replay) starts from: the same weights for the same seed."""
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(SEED)
    return LlamaForCausalLM(config)


def make_token_lists(n: int = N_SAMPLES) -> list[list[int]]:
    """n sequences start, start + 1, ... of 5 to 10 tokens (ids 3..62: no special token)."""
    gen = torch.Generator().manual_seed(SEED)
    sequences = []
    for _ in range(n):
        start = int(torch.randint(3, 50, (1,), generator=gen))
        length = int(torch.randint(5, 11, (1,), generator=gen))
        sequences.append(list(range(start, start + length)))
    return sequences


def per_step_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full parameters (a collective where they are DTensor shards, as under FSDP2)."""
    full = {}
    for name, parameter in model.named_parameters():
        tensor = parameter.detach()
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        full[name] = tensor.cpu().clone()
    return full


class WeightSnapshots(TrainerCallback):
    """Process 0 saves the full parameters at the start of each optimizer step and after the last one."""

    def __init__(self, out: str) -> None:
        self.out = out

    def _save(self, args, step, model) -> None:
        weights = per_step_weights(model)  # every process takes part in the gather
        if args.process_index == 0:
            torch.save(weights, os.path.join(self.out, f"weights_step{step}.pt"))

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._save(args, state.global_step, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._save(args, state.global_step, model)


def recording(trainer_class: type) -> type:
    """trainer_class with each training call of compute_loss recorded (see the module docstring)."""

    class Recording(trainer_class):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.micro_batches: list[dict] = []

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if model.training:
                loss = result[0] if return_outputs else result
                stats = self.dynsdpb_loss.last_stats
                record = {"step": self.state.global_step, "loss": float(loss.detach()),
                          "num_items_in_batch": None if num_items_in_batch is None else float(num_items_in_batch),
                          "teacher_samples": int(stats.teacher_samples), "ce": float(stats.loss.ce),
                          "kl": float(stats.loss.kl), "distill": float(stats.loss.distill), "n_valid": int(stats.loss.n_valid),
                          "n_distilled": int(stats.loss.n_distilled)}
                record.update({key: inputs[key].tolist() for key in ("sample_ids", "input_ids", "attention_mask", "labels")})
                self.micro_batches.append(record)
            return result

    return Recording


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for rank{R}.json (and weights_step{S}.pt)")
    parser.add_argument("--trainer", choices=["trainer", "sft"], default="trainer",
                        help="DynSDPBTrainer, or DynSDPBSFTTrainer (TRL) on the same data pre-tokenized")
    parser.add_argument("--fused-linear", action="store_true", help="the loss from the hidden states (apply_dynsdpb)")
    parser.add_argument("--max-steps", type=int, default=6)
    parser.add_argument("--samples", type=int, default=N_SAMPLES, help="training sequences")
    parser.add_argument("--batch-size", type=int, default=4, help="new samples per micro-batch and process")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--optim", default="sgd", help="TrainingArguments.optim (sgd: plain W -= lr * grad)")
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--tau", type=float, default=2.0)
    parser.add_argument("--dynamic", choices=["true", "false", "alpha", "tau"], default="false")
    parser.add_argument("--teacher", choices=["previous_batch", "previous_visit"], default="previous_batch",
                        help="DLB's previous batch (a step re-runs it), or each sample's previous visit (no re-run)")
    parser.add_argument("--save-weights", action="store_true")
    parser.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: none); each process "
                        "saves its own ring there, dynsdpb_ring_rank{R}.pt")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    options = parse_args(argv)
    os.makedirs(options.out, exist_ok=True)
    tokenizer = hf_byte_tokenizer()
    token_lists = make_token_lists(options.samples)
    common = dict(
        output_dir=options.out, per_device_train_batch_size=options.batch_size, max_steps=options.max_steps,
        gradient_accumulation_steps=options.grad_accum, learning_rate=options.lr, optim=options.optim,
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, logging_steps=1,
        save_strategy="steps" if options.save_steps else "no", save_steps=options.save_steps or 500,
        report_to=[], use_cpu=True, seed=SEED, disable_tqdm=True, dataloader_num_workers=0,
    )
    dynamic = {"true": True, "false": False}.get(options.dynamic, options.dynamic)
    # a fixed ring for DLB's teachers (two calls of rows); last-visit teachers need the whole shard's rows
    # (twice), which the default ring (capacity_rows=None) grows to by itself
    capacity_rows = None if options.teacher == "previous_visit" else 1024
    loss_options = dict(alpha=options.alpha, tau=options.tau, dynamic=dynamic, capacity_rows=capacity_rows,
                        teacher_dtype=torch.float32, fused_linear=options.fused_linear, teacher=options.teacher)
    callbacks = [WeightSnapshots(options.out)] if options.save_weights else []
    model = make_model(tokenizer.vocab_size)
    if options.trainer == "sft":
        import datasets
        from trl import SFTConfig

        from dynsdpb_kernels.integrations.trl import DynSDPBSFTTrainer

        trainer = recording(DynSDPBSFTTrainer)(
            model=model, args=SFTConfig(**common, max_length=64, bf16=False), processing_class=tokenizer,
            train_dataset=datasets.Dataset.from_list([{"input_ids": ids} for ids in token_lists]),
            callbacks=callbacks, **loss_options,
        )
    else:
        dataset = [{"input_ids": torch.tensor(ids), "labels": torch.tensor(ids)} for ids in token_lists]
        trainer = recording(DynSDPBTrainer)(
            model=model, args=TrainingArguments(**common), train_dataset=dataset,
            data_collator=functools.partial(pad_batch, pad_id=tokenizer.pad_token_id), callbacks=callbacks,
            **loss_options,
        )
    trainer.train()
    record = {"world_size": trainer.args.world_size, "rank": trainer.args.process_index,
              "global_step": trainer.state.global_step, "micro_batches": trainer.micro_batches,
              "model_wrapper": type(trainer.model_wrapped).__name__,
              "sharded_parameters": any(hasattr(p, "full_tensor") for p in trainer.model.parameters()),
              "log_history": trainer.state.log_history}
    with open(os.path.join(options.out, f"rank{trainer.args.process_index}.json"), "w") as handle:
        json.dump(record, handle)


if __name__ == "__main__":
    main()
