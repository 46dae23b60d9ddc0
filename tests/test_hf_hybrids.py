"""use_shammie_kernels() on the hybrids transformers generates from its Mamba and Mamba2 mixers (and
two models with short convolutions only): tiny models built offline from configs give the same
logits, training gradients and generations with shammie's kernels as on transformers' torch path,
and the patched run calls shammie's ops."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from shammie.integrations.transformers import use_shammie_kernels  # noqa: E402
from conftest import DEVICES  # noqa: E402
from test_hf_mamba import ops_called, skip_if_ungrouped_gated_norm, tokens  # noqa: E402

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=2, max_position_embeddings=128)
MAMBA2 = dict(mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=16, mamba_chunk_size=16,
              mamba_expand=2)
CONV, SCAN1, SCAN2 = "shammie::causal_conv1d", "shammie::selective_scan", "shammie::ssd_scan"
DECODE1 = {"shammie::causal_conv1d_update", "shammie::selective_state_update"}

# model: (config class, config arguments, ops of a prefill, ops of a decode step, ops of training)
MODELS = {
    "falcon_mamba": ("FalconMambaConfig", dict(state_size=16, expand=2, conv_kernel=4, time_step_rank=8),
                     {CONV, SCAN1}, DECODE1, {SCAN1 + "_backward", CONV + "_backward"}),
    "jamba": ("JambaConfig", dict(mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, attn_layer_period=2,
                                  attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, num_experts=2,
                                  num_experts_per_tok=1),
              {CONV, SCAN1}, DECODE1, {SCAN1 + "_backward"}),
    "zamba": ("ZambaConfig", dict(mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, n_mamba_heads=2,
                                  attn_layer_period=2, attn_layer_offset=1, num_hidden_layers=5,
                                  attention_hidden_size=128),
              {CONV, SCAN1}, DECODE1, {SCAN1 + "_backward"}),
    "bamba": ("BambaConfig", dict(MAMBA2, attn_layer_indices=[1]), {CONV, SCAN2}, DECODE1, {SCAN2 + "_backward"}),
    "granitemoehybrid": ("GraniteMoeHybridConfig", dict(MAMBA2, layer_types=["mamba", "attention"],
                                                        num_local_experts=2, num_experts_per_tok=1),
                         {CONV, SCAN2}, DECODE1, {SCAN2 + "_backward"}),
    "falcon_h1": ("FalconH1Config", dict(MAMBA2, mamba_d_ssm=128, head_dim=16), {CONV, SCAN2}, DECODE1,
                  {SCAN2 + "_backward"}),
    "nemotron_h": ("NemotronHConfig", dict(mamba_num_heads=8, mamba_head_dim=16, n_groups=2, ssm_state_size=16,
                                           chunk_size=16, hybrid_override_pattern="M*", head_dim=16),
                   {CONV, SCAN2}, DECODE1, {SCAN2 + "_backward"}),
    "zamba2": ("Zamba2Config", dict(mamba_headdim=16, n_mamba_heads=8, mamba_ngroups=2, mamba_d_state=16,
                                    chunk_size=16, num_hidden_layers=3, layers_block_type=["mamba", "hybrid", "mamba"],
                                    attention_head_dim=16),
               {CONV, SCAN2}, DECODE1, {SCAN2 + "_backward"}),
    "lfm2": ("Lfm2Config", dict(layer_types=["conv", "full_attention"], conv_L_cache=3), {CONV},
             {"shammie::causal_conv1d_update"}, {CONV + "_backward"}),
    "qwen3_next": ("Qwen3NextConfig", dict(layer_types=["linear_attention", "full_attention"],
                                           linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
                                           linear_value_head_dim=16, head_dim=16, num_experts=2,
                                           num_experts_per_tok=1, moe_intermediate_size=32,
                                           shared_expert_intermediate_size=32),
                   {CONV}, {"shammie::causal_conv1d_update"}, {CONV + "_backward"}),
}


def build(name, device, seed=0):
    config_name, arguments, *_ = MODELS[name]
    config_class = getattr(transformers, config_name, None)
    if config_class is None:
        pytest.skip(f"this transformers has no {config_name}")
    torch.manual_seed(seed)
    config = config_class(**{**SMALL, **arguments})
    return getattr(transformers, config_name.replace("Config", "ForCausalLM"))(config).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(MODELS))
def test_prefill_logits_match(name, device):
    model, ids = build(name, device).eval(), tokens(device, length=37)
    with torch.no_grad():
        expected = model(ids).logits
        with use_shammie_kernels():
            got, called = ops_called(lambda: model(ids).logits)
    assert MODELS[name][2] <= called, f"shammie ops called: {sorted(called)}"
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(MODELS))
def test_training_gradients_match(name, device):
    model, ids = build(name, device).train(), tokens(device, length=37)
    skip_if_ungrouped_gated_norm(model)

    def grads():
        model.zero_grad()
        loss = model(ids, labels=ids, use_cache=False).loss   # no cache: the mixers' fused training entries
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_ref, grads_ref = grads()
    with use_shammie_kernels():
        (loss, got), called = ops_called(grads)
    assert MODELS[name][4] <= called, f"shammie ops called: {sorted(called)}"
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    assert got.keys() == grads_ref.keys()
    for param, g in got.items():
        torch.testing.assert_close(g, grads_ref[param], rtol=2e-3, atol=2e-5, msg=lambda m: f"{param}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(MODELS))
def test_generate_matches(name, device):
    model, ids = build(name, device).eval(), tokens(device, length=12)
    kwargs = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True,
                  pad_token_id=0)
    expected = model.generate(ids, **kwargs)
    with use_shammie_kernels():
        got, called = ops_called(lambda: model.generate(ids, **kwargs))
    assert MODELS[name][3] <= called, f"shammie ops called: {sorted(called)}"
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.scores, expected.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["falcon_h1", "bamba"])
def test_training_under_bf16_autocast(name):
    """Falcon-H1 scales the in-projection's bf16 output by a float32 vector, so the Mamba-2 mixer sees
    float32 activations inside autocast; the loss and gradients follow transformers' path."""
    model, ids = build(name, "cpu").train(), tokens("cpu", length=37)

    def loss_and_grads():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=ids, use_cache=False).loss   # no cache: the fused training entry
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_ref, grads_ref = loss_and_grads()
    with use_shammie_kernels():
        loss, grads = loss_and_grads()
    torch.testing.assert_close(loss, loss_ref, rtol=2e-2, atol=2e-2)
    assert grads.keys() == grads_ref.keys()
    for param, g in grads.items():
        scale = grads_ref[param].abs().max().item() or 1.0
        assert (g - grads_ref[param]).abs().max().item() <= 0.1 * scale, param


@pytest.mark.parametrize("name", [n for n in MODELS if n not in ("lfm2", "qwen3_next")])
def test_adapters_on_the_mixers_projections_train_as_without_shammie(name):
    """MoRe on every x_proj / out_proj: the mixers' fused entries, which take those weights rather than
    the modules, step aside for transformers' unfused path (shammie/integrations/transformers.py), so
    the loss and the adapters' gradients equal transformers' own."""
    from test_hf_mamba import with_adapters

    model = with_adapters(build(name, "cpu"), "more", ["x_proj", "out_proj"]).train()
    skip_if_ungrouped_gated_norm(model)
    ids = tokens("cpu", length=37)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def step():
        loss = model(ids, labels=ids, use_cache=False).loss
        return loss.detach(), dict(zip(trained, torch.autograd.grad(loss, list(trained.values()), allow_unused=True)))

    loss_ref, grads_ref = step()
    with use_shammie_kernels():
        loss, grads = step()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    for param, g in grads.items():
        if g is None:
            assert grads_ref[param] is None, param
            continue
        torch.testing.assert_close(g, grads_ref[param], rtol=2e-3, atol=2e-5, msg=lambda m: f"{param}: {m}")
