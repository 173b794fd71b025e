"""TRL's SFTTrainer with DynSDPB: overlap batches, sample ids through SFT's collator, the teacher ring.

    from trl import SFTConfig
    trainer = DynSDPBSFTTrainer(model=model, args=SFTConfig(...), train_dataset=dataset,
                                processing_class=tokenizer, alpha=1.0, tau=3.0)
    trainer.train()

SFTTrainer prepares the dataset as usual (formatting, chat template, tokenization, labels, truncation,
packing); a sample's id is its index in the prepared dataset, which is fixed for a run and across a resume.
SampleIdDataset attaches the index to each prepared example and SampleIdCollator takes it out around SFT's
own collator, so the batches are exactly SFT's with `sample_ids` added. Everything DynSDPB does (batch
order, loss, logs, the ring in checkpoints, the fused head) is DynSDPBTrainerMixin, shared with
DynSDPBTrainer.
"""

from __future__ import annotations

from trl import SFTConfig, SFTTrainer

from .transformers import DynSDPBTrainerMixin


class DynSDPBSFTTrainer(DynSDPBTrainerMixin, SFTTrainer):
    """trl.SFTTrainer whose training loss is DynSDPB (cross-entropy + self-distillation from the previous
    mini-batch, see DynSDPBLoss), in DLB batch order, with the ring saved in checkpoints.

    Args: SFTTrainer's (model, args=SFTConfig(...), train_dataset with plain text, pre-tokenized
    input_ids, prompt-completion or conversational examples, processing_class, ...) and
    DynSDPBTrainerMixin's (dynsdpb_loss, alpha, tau, dynamic, capacity_rows, teacher_dtype,
    fused_linear, teacher_storage, topk, teacher: "previous_batch" or "previous_visit").

    Raises ValueError for padding-free batches (SFTConfig padding_free=True, or packing with the "bfd"
    strategies, which imply it): they concatenate the batch's samples into one row, so the loss could not
    tell which rows belong to which sample id. Packing with packing_strategy="wrapped" works (each packed
    sequence is one sample). SFT's entropy and mean_token_accuracy are not logged in training (the
    DynSDPB statistics are); SFT's eval loss is plain cross-entropy, as with DynSDPBTrainer.
    """

    def __init__(self, model=None, args: SFTConfig | None = None, *rest, **kwargs) -> None:
        if args is not None and (args.padding_free or (args.packing and args.packing_strategy in {"bfd", "bfd_split"})):
            raise ValueError(
                "DynSDPBSFTTrainer needs one row per sample: set SFTConfig(padding_free=False) and, with packing, "
                f"packing_strategy='wrapped' (got padding_free={args.padding_free}, packing={args.packing}, "
                f"packing_strategy={args.packing_strategy!r})"
            )
        super().__init__(model, args, *rest, **kwargs)
