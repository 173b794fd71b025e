"""Final-logit softcapping (softcap=c: the student logits enter the loss as c tanh(z / c)) on every backend
against the float64 truth of tests/truth.py (torch.tanh in float64, gradient by autograd), with large
logits where tanh saturates, through the ring (which records the capped rows), the fused head, bad values,
and Gemma 2 / Gemma 3 models patched by apply_dynsdpb against the model's own loss and gradients."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import BACKENDS, DYNAMIC_IDS, DYNAMIC_MODES
from test_loss import assert_float32_close, assert_no_worse_than_eager, check_against_truth, make_case
from truth import truth_dynsdpb

from dynsdpb_kernels import DynSDPBLoss, FusedLinearDynSDPBLoss, dynsdpb_loss, fused_linear_dynsdpb_loss
from dynsdpb_kernels.contract import softcapped

CAP = 20.0
VOCAB = 300


def capped_teacher(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """Teacher logits in capped space (as a ring holds them): the student's, perturbed, then capped."""
    return softcapped(logits.float() + torch.randn(logits.shape) * 5.0, cap).to(logits.dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dynamic", DYNAMIC_MODES, ids=DYNAMIC_IDS)
def test_matches_truth(backend, dtype, dynamic):
    # logits ~ +-60 against a cap of 20: every row is partly saturated, partly in tanh's linear range
    logits, labels, _, mask = make_case((3, 5), VOCAB, dtype, scale=20.0)
    teacher = capped_teacher(logits, CAP)
    check_against_truth(backend, logits, labels, teacher, mask, softcap=CAP, tau=2.5, dynamic=dynamic)
    check_against_truth(backend, logits, labels, None, None, softcap=CAP)  # cross-entropy only


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_capping_changes_the_loss(backend, dtype):
    # the option is not a no-op: with large logits the capped loss is far from the raw one
    logits, labels, _, _ = make_case((8,), VOCAB, dtype, scale=50.0)
    raw = dynsdpb_loss(logits, labels, backend=backend)
    capped = dynsdpb_loss(logits, labels, softcap=CAP, backend=backend)
    assert abs(float(raw) - float(capped)) > 1.0
    assert_float32_close(capped, truth_dynsdpb(logits, labels, softcap=CAP)["loss"], "loss")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cap", [30.0, 2.0], ids=["cap30", "cap2"])
def test_saturated_logits_give_finite_loss_and_vanishing_grads(backend, dtype, cap):
    # |z| up to 1e3: tanh(z / c) is +-1 to float32 (exp(-2|z|/c) underflows for c = 2), the gradient there
    # is ~0 (sech^2(z / c) < 1e-12 once |z| / c > 14), and nothing turns into NaN or inf
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(6, VOCAB, generator=gen) * 5.0
    logits[:, ::7] = torch.empty(6, len(range(0, VOCAB, 7))).uniform_(-1e3, 1e3, generator=gen)
    logits[0, :] = torch.linspace(-1e3, 1e3, VOCAB)  # a row saturated at both ends, its label among them
    logits = logits.to(dtype)
    labels = torch.randint(0, VOCAB, (6,), generator=gen)
    labels[0] = VOCAB - 1  # the largest logit, deep in saturation
    teacher = capped_teacher(logits, cap)
    for teachers in ((None, None), (teacher, torch.tensor([True, False, True, True, False, True]))):
        student = logits.clone().requires_grad_(True)
        loss = dynsdpb_loss(student, labels, *teachers, softcap=cap, backend=backend)
        loss.backward()
        truth = truth_dynsdpb(logits, labels, *teachers, softcap=cap)
        assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
        assert_float32_close(loss, truth["loss"], "loss", rtol=1e-5)
        saturated = logits.double().abs() / cap > 14.0
        assert saturated.sum() > 50
        assert (student.grad.double()[saturated].abs() <= 1e-10).all()
        assert truth["grad"][saturated].abs().max() <= 1e-10  # the truth agrees that they vanish
        tol = {torch.float32: 1e-6, torch.bfloat16: 4e-3}[dtype]
        torch.testing.assert_close(student.grad.double(), truth["grad"], rtol=tol, atol=tol * truth["grad"].abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_gradient_and_forward_only(backend):
    logits, labels, _, mask = make_case((4, 3), VOCAB, torch.float32, scale=20.0)
    teacher = capped_teacher(logits, CAP)
    truth = truth_dynsdpb(logits, labels, teacher, mask, softcap=CAP)
    forward = dynsdpb_loss(logits, labels, teacher, mask, softcap=CAP, backend=backend)  # no gradient requested
    assert_float32_close(forward, truth["loss"], "forward-only loss")
    student = logits.clone().requires_grad_(True)
    buffer = student * 1.0  # a non-leaf whose storage the kernel may overwrite
    buffer.retain_grad()
    dynsdpb_loss(buffer, labels, teacher, mask, softcap=CAP, backend=backend, inplace_grad=True).backward()
    torch.testing.assert_close(student.grad.double(), truth["grad"], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_logits_are_still_reported(backend):
    # tanh(inf) = 1 would hide an inf logit; the capped logit is NaN instead and validate names the logits
    logits, labels, _, _ = make_case((4,), VOCAB, torch.float32)
    for bad in (math.inf, -math.inf, math.nan):
        broken = logits.clone()
        broken[2, 5] = bad
        with pytest.raises(ValueError, match="logits contain NaN or inf"):
            dynsdpb_loss(broken.requires_grad_(True), labels, softcap=CAP, backend=backend)
    hidden = torch.randn(4, 8)
    weight = torch.randn(VOCAB, 8)
    weight[7, 0] = math.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        fused_linear_dynsdpb_loss(hidden.requires_grad_(True), weight, labels, softcap=CAP, backend=backend)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan, True, "30"], ids=repr)
def test_bad_softcap_is_named(bad):
    logits, labels, _, _ = make_case((4,), VOCAB, torch.float32)
    with pytest.raises(ValueError, match="softcap"):
        dynsdpb_loss(logits, labels, softcap=bad, backend="reference")
    with pytest.raises(ValueError, match="softcap"):
        fused_linear_dynsdpb_loss(torch.randn(4, 8), torch.randn(VOCAB, 8), labels, softcap=bad, backend="reference")
    for module in (DynSDPBLoss, FusedLinearDynSDPBLoss):
        with pytest.raises(ValueError, match="softcap"):
            module(VOCAB, softcap=bad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("storage", ["dense", "topk"])
def test_ring_records_capped_rows_and_teaches_with_them(backend, storage):
    """Step 1 records c tanh(z / c) (rounded to the ring's dtype) with its (u, d); step 2's teachers are
    exactly those rows: its loss and gradient equal the truth with the previous step's capped logits as
    teachers (the KL over the top-k support for a top-k ring, against the fused call's own dense result)."""
    gen = torch.Generator().manual_seed(11)
    loss_fn = DynSDPBLoss(VOCAB, softcap=CAP, capacity_rows=16, teacher_dtype=torch.float32, teacher_storage=storage,
                          topk=VOCAB, backend=backend)  # k = V: the top-k ring holds whole rows, reordered
    first = torch.randn(4, VOCAB, generator=gen) * 40.0
    labels = torch.randint(0, VOCAB, (4,), generator=gen)
    loss_fn(first.clone().requires_grad_(True), labels, torch.arange(4))
    capped_first = softcapped(first.double(), CAP).float()
    for sample in range(4):
        rows, stats = loss_fn.ring.teacher(sample)
        if storage == "dense":
            torch.testing.assert_close(rows[0], capped_first[sample], rtol=2e-7, atol=2e-6)
        else:  # values sorted, at their ids
            ids = loss_fn.ring.teacher_support(sample)[0]
            torch.testing.assert_close(rows[0], capped_first[sample, ids], rtol=2e-7, atol=2e-6)
        from dynsdpb_kernels import row_statistics

        torch.testing.assert_close(stats[0, :2], row_statistics(capped_first[sample : sample + 1].double())[0].float(),
                                   rtol=1e-5, atol=1e-6)  # (u, d); a dense ring's log-normaliser: test_ring_log_norm
    second = torch.randn(4, VOCAB, generator=gen) * 40.0
    student = second.clone().requires_grad_(True)
    loss = loss_fn(student, labels, torch.arange(4))
    loss.backward()
    assert int(loss_fn.last_stats.teacher_samples) == 4
    truth = truth_dynsdpb(second, labels, capped_first, softcap=CAP)
    assert_float32_close(loss, truth["loss"], "loss", rtol=2e-5)
    torch.testing.assert_close(student.grad.double(), truth["grad"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_head_caps_the_raw_logits(backend):
    """fused_linear_dynsdpb_loss and FusedLinearDynSDPBLoss: hidden @ W.T is capped in the kernel, chunk by
    chunk; loss and gradients of hidden and weight equal the float64 truth by the chain rule."""
    gen = torch.Generator().manual_seed(5)
    vocab = 130  # three blocks of conftest's 64
    hidden = torch.randn(13, 16, generator=gen)
    weight = torch.randn(vocab, 16, generator=gen) * 8.0  # logits ~ +-30 and beyond, against a cap of 20
    labels = torch.randint(0, vocab, (13,), generator=gen)
    labels[::4] = -100
    teacher = capped_teacher(hidden @ weight.T, CAP)
    mask = torch.rand(13, generator=gen) < 0.6
    truth = truth_dynsdpb(hidden.double() @ weight.double().T, labels, teacher, mask, softcap=CAP)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss = fused_linear_dynsdpb_loss(h, w, labels, teacher, mask, softcap=CAP, chunk_size=5, backend=backend)
    loss.backward()
    assert_float32_close(loss, truth["loss"], "loss")
    g = truth["grad"]
    for leaf, true_grad, name in ((h, g @ weight.double(), "hidden"), (w, g.T @ hidden.double(), "weight")):
        assert_no_worse_than_eager(leaf.grad, true_grad, true_grad, 1e-5, 2e-6, name)

    # the module: the same loss as DynSDPBLoss(softcap) on the materialised raw logits, step after step
    fused = FusedLinearDynSDPBLoss(vocab, softcap=CAP, capacity_rows=32, chunk_size=4, backend=backend)
    plain = DynSDPBLoss(vocab, softcap=CAP, capacity_rows=32, backend=backend)
    hidden_3d, labels_3d = hidden[:12].reshape(3, 4, 16), labels[:12].reshape(3, 4).clamp_min(0)
    for _ in range(2):  # step 2 reads the capped rows step 1 recorded
        ours = fused(hidden_3d, weight, labels_3d, torch.arange(3))
        expected = plain(hidden_3d @ weight.T, labels_3d, torch.arange(3))
        assert_float32_close(ours, expected, "module loss", rtol=1e-5)
    assert int(fused.last_stats.teacher_samples) == 3


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_compiled_step_carries_the_softcap(backend):
    # torch.compile captures the step as one graph; the softcap travels through the operator's schema
    from torch._dynamo.testing import CompileCounterWithBackend

    logits, labels, _, mask = make_case((6,), VOCAB, torch.float32, scale=20.0)
    teacher = capped_teacher(logits, CAP)

    def step(z):
        return dynsdpb_loss(z, labels, teacher, mask, softcap=CAP, validate=False, backend=backend)

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    student = logits.clone().requires_grad_(True)
    loss = torch.compile(step, backend=counter, fullgraph=True)(student)
    loss.backward()
    torch._dynamo.reset()
    assert counter.frame_count == 1
    truth = truth_dynsdpb(logits, labels, teacher, mask, softcap=CAP)
    assert_float32_close(loss, truth["loss"], "loss")
    torch.testing.assert_close(student.grad.double(), truth["grad"], rtol=1e-4, atol=1e-7)


# ---- Gemma 2 / Gemma 3: the config's final_logit_softcapping through apply_dynsdpb and the Trainer ----

transformers = pytest.importorskip("transformers")

from test_model_families import VOCAB as MODEL_VOCAB  # noqa: E402
from test_model_families import _batch as family_batch  # noqa: E402
from test_model_families import _model as family_model  # noqa: E402

from dynsdpb_kernels.integrations.transformers import DynSDPBTrainer, apply_dynsdpb  # noqa: E402

FAMILIES = ["gemma2", "gemma3"]  # configs that name final_logit_softcapping


def softcapped_model(family: str, cap: float = 30.0):
    """test_model_families' tiny model of `family` with final_logit_softcapping=cap, its head scaled 4x more
    (400x in all): raw logits far beyond the cap, so that capping decides the loss."""
    model = family_model(family, final_logit_softcapping=cap)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(4.0)
    return model


def model_batch():
    input_ids, attention_mask, labels = family_batch()
    return dict(input_ids=input_ids, attention_mask=attention_mask), labels


def own_loss_and_grads(model, inputs, labels):
    """The unpatched model's loss with labels (it caps its logits itself) and autograd's parameter gradients."""
    model.zero_grad()
    output = model(**inputs, labels=labels)
    output.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return output, grads


def assert_same_grads(model, expected):
    got = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6 * grad.abs().max().item() + 1e-9, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_apply_dynsdpb_on_a_softcapped_model_equals_its_own_loss_and_grads(family, backend):
    model = softcapped_model(family)
    inputs, labels = model_batch()
    own, own_grads = own_loss_and_grads(model, inputs, labels)
    raw = model.get_decoder()(**inputs).last_hidden_state @ model.get_output_embeddings().weight.T
    assert raw.abs().max() > 150.0 and own.logits.abs().max() <= 30.0  # capping matters here

    # the logits path: the model's own (capped) logits into DynSDPBLoss without a softcap of its own
    logits_loss = DynSDPBLoss(MODEL_VOCAB, capacity_rows=64, backend=backend)
    output = model(**inputs)
    loss = logits_loss(output.logits, labels, torch.arange(3))
    loss.backward()
    torch.testing.assert_close(loss, own.loss.detach(), rtol=1e-5, atol=1e-5)
    assert_same_grads(model, own_grads)
    model.zero_grad()

    # the fused head: apply_dynsdpb reads final_logit_softcapping and caps hidden @ W.T in the kernel
    fused = apply_dynsdpb(model, capacity_rows=64, backend=backend)
    assert fused.options.distill.softcap == 30.0
    patched = model(**inputs, labels=labels, sample_ids=torch.arange(3))
    assert patched.logits is None
    patched.loss.backward()
    torch.testing.assert_close(patched.loss, own.loss.detach(), rtol=1e-5, atol=1e-5)
    assert_same_grads(model, own_grads)
    assert int(fused.last_stats.teacher_samples) == 0  # teachers off: the first step


def test_apply_dynsdpb_refuses_a_softcap_other_than_the_configs(tmp_path):
    model = softcapped_model("gemma2")
    with pytest.raises(ValueError, match="softcap=None but Gemma2ForCausalLM has config.final_logit_softcapping=30.0"):
        apply_dynsdpb(model, FusedLinearDynSDPBLoss(MODEL_VOCAB))
    with pytest.raises(ValueError, match="softcap=10.0"):
        apply_dynsdpb(model, softcap=10.0)
    assert "forward" not in vars(model) and not hasattr(model, "dynsdpb_loss")  # left unpatched
    args = transformers.TrainingArguments(str(tmp_path), report_to=[], use_cpu=True)
    trainer = DynSDPBTrainer(model=model, args=args, train_dataset=[], fused_linear=True)
    assert trainer.dynsdpb_loss.options.distill.softcap == 30.0  # the Trainer builds the loss from the config
    del model.forward
    # the logits path trains the model's own, already capped, logits: no softcap in the loss
    assert DynSDPBTrainer(model=model, args=args, train_dataset=[]).dynsdpb_loss.options.distill.softcap is None
