"""Hugging Face Trainer with DynSDPB: overlap batches, sample ids, the fused loss and its teacher ring.

    trainer = DynSDPBTrainer(model=model, args=TrainingArguments(...), train_dataset=dataset,
                             data_collator=collator, alpha=1.0, tau=3.0)
    trainer.train()

Each training batch is the previous step's new samples followed by per_device_train_batch_size new ones
(OverlapBatchSampler), so a step holds up to twice per_device_train_batch_size samples. The model runs
without labels; its logits go to DynSDPBLoss, which distills the samples seen one step earlier.
"""

from __future__ import annotations

import functools
import math
import os
from collections import defaultdict
from collections.abc import Mapping

import torch
from torch.utils.data import DataLoader
from transformers import Trainer

from ..module import DynSDPBLoss, FusedLinearDynSDPBLoss
from ..sampler import OverlapBatchSampler, SampleIdCollator, SampleIdDataset, VisitBatchSampler

RING_FILE = "dynsdpb_ring.pt"

# Config fields with which a model's head transforms hidden @ W.T before its loss, and their neutral value.
# The fused path computes the loss from hidden @ W.T (+ bias) and, when the config names one, its softcap
# (SOFTCAP_FIELD) alone, so it refuses these.
LOGIT_TRANSFORM_FIELDS = {
    "logit_scale": 1.0,  # Cohere: logits * scale
    "logits_scaling": 1.0,  # Granite: logits / scaling
    "lm_head_multiplier": 1.0,  # Falcon-H1
    "output_multiplier": 1.0,
}


def check_plain_head(model) -> None:
    """Raise ValueError when the model's config says its head transforms the logits (LOGIT_TRANSFORM_FIELDS
    set to a non-neutral value): the fused path would train a different objective in silence."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for field, neutral in LOGIT_TRANSFORM_FIELDS.items():
        value = getattr(config, field, None)
        if value is not None and value != neutral:
            raise ValueError(
                f"apply_dynsdpb: {type(model).__name__} has config.{field}={value!r}, a transform of the logits "
                f"that the fused head does not apply; train through the model's own logits instead "
                f"(DynSDPBTrainer / DynSDPBSFTTrainer with fused_linear=False)"
            )


# Gemma 2 / Gemma 3: logits = cap * tanh(logits / cap) after the head; the fused loss applies it (softcap=).
SOFTCAP_FIELD = "final_logit_softcapping"


def model_softcap(model) -> float | None:
    """The final-logit softcap the model's (text) config names (config.final_logit_softcapping), or None."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    value = getattr(config, SOFTCAP_FIELD, None)
    return float(value) if value is not None else None


def apply_dynsdpb(model, loss: FusedLinearDynSDPBLoss | None = None, **loss_options) -> FusedLinearDynSDPBLoss:
    """Make a causal LM of the LLaMA family (`model.model` the decoder, `model.lm_head` the head) compute
    DynSDPB through the fused linear path in training: when called in train mode with `labels` and
    `sample_ids`, its forward runs the decoder, hands the last hidden states and the head's weight to
    FusedLinearDynSDPBLoss (no (B, T, V) logits are formed) and returns an output whose `loss` is the
    DynSDPB loss and whose `logits` is None. Every other call (eval, generation, no sample_ids) runs
    the model's own forward unchanged.

    The loss runs inside a call of the head module (its forward is routed to the loss for that call), so
    a sharding engine's hooks on the head (FSDP2 `fully_shard(lm_head)`, FSDP1, DeepSpeed ZeRO-3) gather
    its weight for the loss and reduce its gradient, as for the model's own head.

    Args:
        model: e.g. LlamaForCausalLM (any *ForCausalLM with get_decoder() and get_output_embeddings()).
        loss: the FusedLinearDynSDPBLoss to use; by default one is built with `loss_options`
            (alpha, tau, dynamic, capacity_rows, teacher_storage, topk, chunk_size, accum_dtype, ...).
    Returns the loss module (also reachable as model.dynsdpb_loss; not a submodule, so model checkpoints
    stay plain: save its ring with loss.ring.state_dict()). `del model.forward` undoes the patch.

    A final-logit softcap in the config (Gemma 2 / 3's config.final_logit_softcapping, model_softcap) becomes
    the loss's softcap: the kernel caps hidden @ W.T as the model's head would, so the loss is the model's.

    Raises ValueError, before changing anything, for a model whose head transforms the logits otherwise
    (e.g. Cohere's config.logit_scale; see LOGIT_TRANSFORM_FIELDS), and for a softcap (in loss_options or
    on `loss`) other than the config's.
    """
    from transformers.modeling_outputs import CausalLMOutputWithPast

    check_plain_head(model)
    softcap = model_softcap(model)
    given = loss.options.distill.softcap if loss is not None else loss_options.get("softcap", softcap)
    if given != softcap:
        raise ValueError(
            f"apply_dynsdpb: softcap={given!r} but {type(model).__name__} has config.{SOFTCAP_FIELD}={softcap!r}; "
            f"the fused loss must cap the logits as the model's head does"
        )
    if loss is None:
        weight = model.get_output_embeddings().weight
        vocab_size = getattr(weight, "ds_shape", weight.shape)[0]  # (ZeRO-3 keeps the full shape in ds_shape)
        loss = FusedLinearDynSDPBLoss(vocab_size, **{**loss_options, "softcap": softcap})
    original_forward = model.forward

    # a plain function wrapping the bound forward keeps its signature visible (the Trainer reads it to
    # decide which dataset columns the model takes)
    @functools.wraps(original_forward)
    def forward(*args, labels=None, sample_ids=None, num_items_in_batch=None, **kwargs):
        if args or not (model.training and labels is not None and sample_ids is not None):
            if num_items_in_batch is not None:
                kwargs["num_items_in_batch"] = num_items_in_batch
            return original_forward(*args, labels=labels, **kwargs)
        kwargs.pop("logits_to_keep", None)
        outputs = model.get_decoder()(**kwargs)

        def head_loss(hidden, weight, bias):
            return loss(hidden, weight, labels, sample_ids, bias=bias, num_items_in_batch=num_items_in_batch)

        value = call_through_module(model.get_output_embeddings(), head_loss, outputs.last_hidden_state)
        return CausalLMOutputWithPast(loss=value, logits=None, hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    model.forward = forward
    object.__setattr__(model, "dynsdpb_loss", loss)  # plain attribute: not registered as a submodule
    return loss


def call_through_module(head: torch.nn.Module, compute, hidden: torch.Tensor) -> torch.Tensor:
    """compute(hidden, weight, bias) evaluated inside a call of `head`: for that call the forward of the
    Linear that holds the weight (the module itself, or the one an FSDP1 wrapper wraps) is routed to
    compute, so the hooks around the call run as for the head's own forward: a sharding engine gathers
    the weight before (the tensor compute receives is the full one) and registers the reduction of its
    gradient after."""
    linear = getattr(head, "_fsdp_wrapped_module", head)
    previous = linear.__dict__.get("forward")
    linear.forward = lambda inputs: compute(inputs, linear.weight, linear.bias)
    try:
        return head(hidden)
    finally:
        if previous is None:
            del linear.forward
        else:
            linear.forward = previous


LOGGED_STATS = ("ce", "kl", "alpha_mean", "tau_mean")
# DynSDPBTrainerMixin's alpha_schedule values (scheduled_alpha)
ALPHA_SCHEDULES = ("constant", "epoch_ramp")


class DynSDPBTrainerMixin:
    """The DynSDPB part of a `transformers.Trainer` subclass, shared by DynSDPBTrainer and
    integrations.trl.DynSDPBSFTTrainer: put it before the Trainer class in the bases.

    Args (besides the Trainer's):
        dynsdpb_loss: a DynSDPBLoss to use; by default one is built from the model's output vocabulary
            with alpha, tau, dynamic, capacity_rows and teacher_dtype.
        alpha, tau, dynamic, capacity_rows, teacher_dtype: DynSDPBLoss options.
        fused_linear: compute the loss from the last hidden states through the fused linear path
            (apply_dynsdpb): the (B, T, V) logits are never formed in training. teacher_storage and
            topk choose the ring's storage ("topk" keeps it small as well).
        teacher: "previous_batch" (default, DLB: OverlapBatchSampler, a step holds up to twice
            per_device_train_batch_size samples) or "previous_visit" (each sample taught by its logits
            from the previous epoch, no re-run: VisitBatchSampler, per_device_train_batch_size samples a
            step, fixed shards per process; the first epoch has no teachers; top-k ring by default).
        alpha_schedule: "constant" (default) or "epoch_ramp": alpha_t = alpha * t / T in epoch t of T
            (PS-KD's ramp, scheduled_alpha), which the compute-matched study found last-visit teachers
            need (docs/study_compute.md). ValueError for another value.

    What it changes:
        - train dataloader: (a datasets.Dataset loses the columns the model does not take, as in the
          Trainer) SampleIdDataset + OverlapBatchSampler (VisitBatchSampler for teacher="previous_visit";
          seeded with data_seed or seed; one disjoint
          stream per process) + SampleIdCollator around data_collator; a sample's id is its index in
          the train dataset; accelerate neither shards nor dispatches them again (see
          _prepare_own_stream), so each process trains every step on its own stream;
        - device placement (_prepare_inputs): every tensor of a batch but `sample_ids` goes to the device
          as the Trainer puts it there; the ids stay on the CPU, where the teacher ring reads them (on the
          GPU they would come back to the host each step: a synchronisation);
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
        dynamic: bool | str = True,
        capacity_rows: int | None = None,
        teacher_dtype: torch.dtype = torch.bfloat16,
        fused_linear: bool = False,
        teacher_storage: str | None = None,
        topk: int = 64,
        teacher: str = "previous_batch",
        alpha_schedule: str = "constant",
        **kwargs,
    ) -> None:
        if alpha_schedule not in ALPHA_SCHEDULES:
            raise ValueError(f"alpha_schedule must be one of {ALPHA_SCHEDULES}, got {alpha_schedule!r}")
        super().__init__(*args, **kwargs)
        self.fused_linear = fused_linear
        self.alpha_schedule = alpha_schedule
        if dynsdpb_loss is None:
            vocab_size = self.model.get_output_embeddings().weight.shape[0]
            options = dict(alpha=alpha, tau=tau, dynamic=dynamic, capacity_rows=capacity_rows, teacher_dtype=teacher_dtype,
                           teacher_storage=teacher_storage, topk=topk, teacher=teacher)
            if fused_linear:  # the fused head caps the raw logits as the model would (the logits path gets capped ones)
                dynsdpb_loss = FusedLinearDynSDPBLoss(vocab_size, softcap=model_softcap(self.model), **options)
            else:
                dynsdpb_loss = DynSDPBLoss(vocab_size, **options)
        if fused_linear:
            if not isinstance(dynsdpb_loss, FusedLinearDynSDPBLoss):
                raise TypeError("fused_linear=True needs a FusedLinearDynSDPBLoss as dynsdpb_loss")
            apply_dynsdpb(self.model, dynsdpb_loss)
        self.dynsdpb_loss = dynsdpb_loss
        self._alpha = dynsdpb_loss.options.distill.alpha  # the schedule's alpha (a given dynsdpb_loss's own)
        self._stat_sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), dtype=torch.float64))
        self._stat_calls = 0

    def get_train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise ValueError(f"{type(self).__name__}: training requires a train_dataset")
        args = self.args
        dataset = self.train_dataset
        if _is_hf_dataset(dataset):  # as the Trainer does: keep the columns the model (or collator) takes
            dataset = self._remove_unused_columns(dataset, description="training")
        dataset = SampleIdDataset(dataset)
        # DLB's overlap order for teachers from the previous batch; plain epochs over fixed per-rank shards
        # for teachers from the previous visit
        order = VisitBatchSampler if self.dynsdpb_loss.teacher == "previous_visit" else OverlapBatchSampler
        sampler = order(
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
        return self._prepare_own_stream(loader)

    def _prepare_own_stream(self, loader: DataLoader) -> DataLoader:
        """The train loader prepared by accelerate as for one process (DataLoaderShard: its batches stay on
        the CPU until _prepare_inputs), neither sharded nor dispatched again -- the OverlapBatchSampler already
        gives this process its own stream. (accelerate's own sharding, BatchSamplerShard, deals out whole
        batches round-robin and yields only batches of the sampler's batch_size: it would break the overlap
        of consecutive batches, and end the epoch after the first batch, since DLB batches after the first
        hold 2 * batch_size samples. DataLoaderDispatcher would split each batch over the processes.)"""
        from accelerate.data_loader import prepare_data_loader

        accelerator = self.accelerator
        prepared = prepare_data_loader(
            loader,
            accelerator.device,
            num_processes=1,
            process_index=0,
            put_on_device=False,  # _prepare_inputs places the batch, all but its sample_ids
            rng_types=accelerator.rng_types.copy(),
            dispatch_batches=False,
            non_blocking=accelerator.non_blocking,
            use_stateful_dataloader=accelerator.use_stateful_dataloader,
        )
        # registered with the accelerator (for its save_state / free_memory) as Accelerator.prepare marks what it
        # prepared, so that prepare_data_loader only registers it and does not wrap it again
        prepared._is_accelerate_prepared = True
        prepared = accelerator.prepare_data_loader(prepared)
        if prepared.batch_sampler is not loader.batch_sampler:
            raise RuntimeError(
                f"{type(self).__name__}: accelerate replaced the {type(loader.batch_sampler).__name__} of the train "
                f"dataloader by {type(prepared.batch_sampler).__name__}; the batch order the teachers rely on would be lost"
            )
        return prepared

    def _prepare_inputs(self, inputs):
        """The Trainer's placement of a batch on the device (accelerate's send_to_device with its
        non_blocking setting, then the Trainer's own), except `sample_ids`: they stay the CPU tensor the
        collator made, since the ring reads them on the host and a copy to the GPU would have to come back."""
        from accelerate.utils import send_to_device

        if not isinstance(inputs, Mapping) or "sample_ids" not in inputs:
            return super()._prepare_inputs(inputs)
        inputs = dict(inputs)
        sample_ids = inputs.pop("sample_ids")
        if self.accelerator.device_placement:
            inputs = send_to_device(inputs, self.accelerator.device, non_blocking=self.accelerator.non_blocking)
        inputs = super()._prepare_inputs(inputs)
        inputs["sample_ids"] = sample_ids
        return inputs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        self.dynsdpb_loss.train(model.training)
        if model.training and self.alpha_schedule == "epoch_ramp":
            self.dynsdpb_loss.set_alpha(self.scheduled_alpha())
        if self.fused_linear:  # the patched forward computes the loss from the hidden states
            if not model.training:
                inputs.pop("sample_ids", None)
            outputs = model(**inputs, num_items_in_batch=num_items_in_batch)
            loss = outputs["loss"]
        else:
            labels = inputs.pop("labels")
            sample_ids = inputs.pop("sample_ids", None)
            outputs = model(**inputs)
            logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
            loss = self.dynsdpb_loss(
                logits, labels, sample_ids if model.training else None, num_items_in_batch=num_items_in_batch
            )
        if model.training:
            self._accumulate_stats()
            if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # num_items_in_batch was summed over processes
        return (loss, outputs) if return_outputs else loss

    def scheduled_alpha(self) -> float:
        """alpha for the current training step: the loss's own alpha with alpha_schedule="constant"; with
        "epoch_ramp", PS-KD's ramp alpha_t = alpha * t / T in epoch t = 0..T-1 of T = state.num_train_epochs
        (t = the whole epochs state.epoch has completed), so that teachers from the first epochs, the least
        trained, weigh least. Read from the Trainer's state, so a resumed run continues the ramp."""
        if self.alpha_schedule == "constant":
            return self._alpha
        epochs = max(1, math.ceil(self.state.num_train_epochs or 1))
        return self._alpha * min(int(self.state.epoch or 0), epochs - 1) / epochs

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

    def _ring_file(self) -> str:
        """This process's ring file in a checkpoint folder: each process keeps its own teachers."""
        return RING_FILE if self.args.world_size == 1 else f"dynsdpb_ring_rank{self.args.process_index}.pt"

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        ring = self.dynsdpb_loss.ring
        if ring is None:
            return
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        torch.save(ring.state_dict(), os.path.join(folder, self._ring_file()))

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, self._ring_file())
        if not os.path.isfile(path):
            return
        self.dynsdpb_loss.load_ring_state_dict(torch.load(path, map_location="cpu", weights_only=True))


class DynSDPBTrainer(DynSDPBTrainerMixin, Trainer):
    """transformers.Trainer whose training loss is DynSDPB (cross-entropy + self-distillation from the
    previous mini-batch, or with teacher="previous_visit" from each sample's previous visit), see
    DynSDPBLoss for the formula and DynSDPBTrainerMixin for the options (dynsdpb_loss, alpha, tau,
    dynamic, capacity_rows, teacher_dtype, fused_linear, teacher_storage, topk, teacher) and for what it
    changes in the Trainer."""


def _is_hf_dataset(dataset: object) -> bool:
    try:
        import datasets
    except ImportError:
        return False
    return isinstance(dataset, datasets.Dataset)
