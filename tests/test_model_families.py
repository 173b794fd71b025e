"""apply_dynsdpb across model families: with teachers off (the first step, an empty ring) the patched loss
equals the model's own cross-entropy on a tiny config with large logits, and a model whose head transforms
the logits other than by a softcap (Cohere's logit scale) is refused by name, unpatched. (Gemma 2 / 3's
final-logit softcapping is applied by the fused loss: tests/test_softcap.py.)"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from dynsdpb_kernels.integrations.transformers import DynSDPBTrainer, apply_dynsdpb  # noqa: E402

VOCAB = 97
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=2, pad_token_id=0)


def _model(family: str, **overrides):
    configs = {
        "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
        "mistral": ("MistralConfig", "MistralForCausalLM", {}),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
        "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
        "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8}),
        "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 8}),
        "cohere": ("CohereConfig", "CohereForCausalLM", {}),
    }
    config_name, model_name, extra = configs[family]
    config = getattr(transformers, config_name)(**COMMON, **extra, **overrides)
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).float()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(100.0)  # large logits: a skipped transform would show
    return model


def _batch():
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, VOCAB, (3, 9), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return input_ids, attention_mask, labels


@pytest.mark.parametrize(
    ("family", "overrides"),
    [("llama", {}), ("mistral", {}), ("qwen2", {}), ("qwen3", {}), ("phi3", {}),
     ("gemma2", {"final_logit_softcapping": None}), ("gemma3", {})],
    ids=["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2_no_softcap", "gemma3"],
)
def test_patched_loss_equals_the_models_cross_entropy(family, overrides):
    model = _model(family, **overrides)
    input_ids, attention_mask, labels = _batch()
    own_output = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    own = own_output.loss.detach()
    apply_dynsdpb(model, capacity_rows=64, backend="reference")
    patched = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, sample_ids=torch.arange(3))
    assert patched.logits is None
    assert own_output.logits.abs().max() > 30.0  # large logits: beyond Gemma 2's softcap of 30
    torch.testing.assert_close(patched.loss, own, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("family", "field"), [("cohere", "logit_scale")])
def test_a_head_that_transforms_the_logits_is_refused(family, field, tmp_path):
    model = _model(family)
    with pytest.raises(ValueError, match=f"config.{field}="):
        apply_dynsdpb(model)
    assert "forward" not in vars(model) and not hasattr(model, "dynsdpb_loss")  # left unpatched
    args = transformers.TrainingArguments(str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match=field):
        DynSDPBTrainer(model=model, args=args, train_dataset=[], fused_linear=True)
    # the logits path trains the model's own (softcapped / scaled) logits: accepted
    DynSDPBTrainer(model=model, args=args, train_dataset=[])
