"""Hugging Face Trainer with DynSDPB: overlap batches, sample ids, the fused loss and its teacher ring.

    trainer = DynSDPBTrainer(model=model, args=TrainingArguments(...), train_dataset=dataset,
                             data_collator=collator, alpha=1.0, tau=3.0)
    trainer.train()

Each training batch is the previous step's new samples followed by per_device_train_batch_size new ones
(OverlapBatchSampler), so a step holds up to twice per_device_train_batch_size samples. The model runs
without labels; its logits go to DynSDPBLoss, which distills the samples seen one step earlier.
"""

from __future__ import annotations

import os
from collections import defaultdict

import torch
from torch.utils.data import DataLoader
from transformers import Trainer

from ..module import DynSDPBLoss
from ..sampler import OverlapBatchSampler, SampleIdCollator, SampleIdDataset

RING_FILE = "dynsdpb_ring.pt"
LOGGED_STATS = ("ce", "kl", "alpha_mean", "tau_mean")


class DynSDPBTrainer(Trainer):
    """transformers.Trainer whose training loss is DynSDPB (cross-entropy + self-distillation from the
    previous mini-batch), see DynSDPBLoss for the formula.

    Args (besides Trainer's):
        dynsdpb_loss: a DynSDPBLoss to use; by default one is built from the model's output vocabulary
            with alpha, tau, dynamic, capacity_rows and teacher_dtype.
        alpha, tau, dynamic, capacity_rows, teacher_dtype: DynSDPBLoss options.

    What it changes:
        - train dataloader: SampleIdDataset + OverlapBatchSampler (seeded with data_seed or seed; one
          disjoint stream per process) + SampleIdCollator around data_collator;
        - compute_loss: logits from the model, DynSDPBLoss with num_items_in_batch in training, plain
          cross-entropy in evaluation;
        - logs: ce (mean over the valid rows since the last log), kl, alpha_mean, tau_mean (means over
          the distilled rows), teacher_samples (per step) and ring_bytes join the training loss;
        - checkpoints: the ring is saved as dynsdpb_ring.pt and restored on resume, so a resumed run
          has exactly the same teachers.
    """

    def __init__(
        self,
        *args,
        dynsdpb_loss: DynSDPBLoss | None = None,
        alpha: float = 1.0,
        tau: float = 3.0,
        dynamic: bool = True,
        capacity_rows: int | None = None,
        teacher_dtype: torch.dtype = torch.bfloat16,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        if dynsdpb_loss is None:
            vocab_size = self.model.get_output_embeddings().weight.shape[0]
            dynsdpb_loss = DynSDPBLoss(
                vocab_size, alpha=alpha, tau=tau, dynamic=dynamic, capacity_rows=capacity_rows, teacher_dtype=teacher_dtype
            )
        self.dynsdpb_loss = dynsdpb_loss
        self._stat_sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), dtype=torch.float64))
        self._stat_calls = 0

    def get_train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise ValueError("DynSDPBTrainer: training requires a train_dataset")
        args = self.args
        dataset = SampleIdDataset(self.train_dataset)
        sampler = OverlapBatchSampler(
            len(dataset),
            self._train_batch_size,
            drop_last=args.dataloader_drop_last,
            seed=args.data_seed if args.data_seed is not None else args.seed,
            num_replicas=args.world_size,
            rank=args.process_index,
        )
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=SampleIdCollator(self.data_collator),
            num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory and torch.cuda.is_available(),
        )
        prepared = self.accelerator.prepare(loader)
        # The sampler already gives each process its own stream: keep accelerate from sharding it again.
        shard = getattr(prepared, "batch_sampler", None)
        if shard is not None and getattr(shard, "batch_sampler", None) is sampler:
            shard.num_processes = 1
            shard.process_index = 0
        return prepared

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        sample_ids = inputs.pop("sample_ids", None)
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        self.dynsdpb_loss.train(model.training)
        loss = self.dynsdpb_loss(
            logits, labels, sample_ids if model.training else None, num_items_in_batch=num_items_in_batch
        )
        if model.training:
            self._accumulate_stats()
            if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # num_items_in_batch was summed over processes
        return (loss, outputs) if return_outputs else loss

    def _accumulate_stats(self) -> None:
        """Add this call's stats, weighted by its row counts, to the sums of the logging window (on the
        device: no sync until the next log)."""
        stats = self.dynsdpb_loss.last_stats
        if stats is None:
            return
        n_valid = stats.loss.n_valid.double()
        n_distilled = stats.loss.n_distilled.double()
        weighted = {"ce": stats.loss.ce * n_valid, "n_valid": n_valid, "n_distilled": n_distilled,
                    "teacher_samples": stats.teacher_samples.double()}
        weighted.update({name: getattr(stats.loss, name) * n_distilled for name in LOGGED_STATS if name != "ce"})
        for name, value in weighted.items():
            value = value.detach().double()
            self._stat_sums[name] = self._stat_sums[name].to(value.device) + value
        self._stat_calls += 1

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._stat_calls:
            sums = {name: float(total) for name, total in self._stat_sums.items()}  # one sync per log
            logs["ce"] = round(sums["ce"] / max(sums["n_valid"], 1), 6)
            for name in LOGGED_STATS[1:]:  # means over the distilled rows of the window
                logs[name] = round(sums[name] / max(sums["n_distilled"], 1), 6)
            logs["teacher_samples"] = round(sums["teacher_samples"] / self._stat_calls, 3)
            ring = self.dynsdpb_loss.ring
            logs["ring_bytes"] = ring.nbytes if ring is not None else 0
            self._stat_sums.clear()
            self._stat_calls = 0
        super().log(logs, *args, **kwargs)

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        ring = self.dynsdpb_loss.ring
        if ring is None:
            return
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        # each process keeps its own teachers
        name = RING_FILE if self.args.world_size == 1 else f"dynsdpb_ring_rank{self.args.process_index}.pt"
        torch.save(ring.state_dict(), os.path.join(folder, name))

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        name = RING_FILE if self.args.world_size == 1 else f"dynsdpb_ring_rank{self.args.process_index}.pt"
        path = os.path.join(checkpoint, name)
        if not os.path.isfile(path):
            return
        self.dynsdpb_loss.load_ring_state_dict(torch.load(path, map_location="cpu", weights_only=True))
