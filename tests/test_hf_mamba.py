"""shammie.integrations.transformers: HF Mamba models built offline from configs give the same logits,
gradients and generations with shammie's kernels as on transformers' own torch path."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from shammie.integrations.transformers import is_patched, use_shammie_kernels  # noqa: E402
from conftest import DEVICES, run_example  # noqa: E402


def tiny_mamba(device, seed=0):
    torch.manual_seed(seed)
    config = transformers.MambaConfig(vocab_size=97, hidden_size=48, state_size=16, num_hidden_layers=2, expand=2,
                                      conv_kernel=4, time_step_rank=6)
    return transformers.MambaForCausalLM(config).to(device)


def tiny_mamba2(device, seed=0):
    torch.manual_seed(seed)
    config = transformers.Mamba2Config(vocab_size=97, hidden_size=64, state_size=16, num_hidden_layers=2, expand=2,
                                       head_dim=16, num_heads=8, n_groups=2, conv_kernel=4, chunk_size=16)
    return transformers.Mamba2ForCausalLM(config).to(device)


def ops_called(fn):
    """Run fn under the profiler; return its result and the shammie ops it called."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = fn()
    return result, {e.name for e in prof.events() if e.name.startswith("shammie::")}


def tokens(device, batch=2, length=37, seed=1):
    return torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(seed)).to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_prefill_logits_match(device):
    model, ids = tiny_mamba(device).eval(), tokens(device)
    with torch.no_grad():
        expected = model(ids).logits
        with use_shammie_kernels():
            got, called = ops_called(lambda: model(ids).logits)
            cached = model(ids, use_cache=True).logits   # conv + scan with the last state for the cache
    assert {"shammie::causal_conv1d", "shammie::selective_scan"} <= called
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cached, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("build,ops", [
    (tiny_mamba, {"shammie::selective_scan", "shammie::selective_scan_backward", "shammie::causal_conv1d_backward"}),
    (tiny_mamba2, {"shammie::ssd_scan", "shammie::ssd_scan_backward", "shammie::causal_conv1d_backward"}),
], ids=["mamba", "mamba2"])
def test_training_gradients_match(build, ops, device):
    """Mamba trains through mamba_inner_fn, Mamba2 through the conv and the SSD scan; transformers'
    own paths are a Python loop (Mamba) and the chunked SSD in torch (Mamba2)."""
    model, ids = build(device).train(), tokens(device)
    skip_if_ungrouped_gated_norm(model)

    def grads():
        model.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_ref, grads_ref = grads()
    with use_shammie_kernels():
        (loss, got), called = ops_called(grads)
    assert ops <= called
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    for name, g in got.items():
        torch.testing.assert_close(g, grads_ref[name], rtol=2e-3, atol=2e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("build", [tiny_mamba, tiny_mamba2], ids=["mamba", "mamba2"])
def test_training_is_deterministic_under_deterministic_algorithms(build, device):
    """Under torch.use_deterministic_algorithms a training step through shammie's ops raises no alert
    and repeats bit for bit (on CUDA: the selective scan's fixed-order backward, the SSD scan's chunked
    form). warn_only, so that cuBLAS does not ask for CUBLAS_WORKSPACE_CONFIG; an alert from one of
    shammie's ops is turned into an error."""
    import warnings

    model, ids = build(device).train(), tokens(device)

    def grads():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with use_shammie_kernels(), warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*shammie.*")
            first, second = grads(), grads()
    finally:
        torch.use_deterministic_algorithms(False)
    for name in first:
        assert torch.equal(first[name], second[name]), f"{name} changed between identical steps"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("build", [tiny_mamba, tiny_mamba2], ids=["mamba", "mamba2"])
def test_per_sample_gradients_with_torch_func(build, device):
    """vmap(grad(loss)) over the examples of a batch (differentially private training, as Opacus'
    functorch mode runs it) through shammie's kernels equals a backward of each example on its own.
    functorch's slow fallback, which warns, is an error here."""
    import warnings

    model, ids = build(device).train().double(), tokens(device, batch=3, length=21)
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(params, example):
        return torch.func.functional_call(model, params, (example[None],), {"labels": example[None]}).loss

    with use_shammie_kernels(), warnings.catch_warnings():
        warnings.simplefilter("error")
        per_sample, called = ops_called(lambda: torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, ids))
        assert any(op.endswith("_backward") for op in called), called
        for i in range(ids.shape[0]):
            model.zero_grad()
            model(ids[i:i + 1], labels=ids[i:i + 1]).loss.backward()
            for name, p in model.named_parameters():
                torch.testing.assert_close(per_sample[name][i], p.grad, msg=lambda m: f"{name}, example {i}: {m}")


def with_adapters(model, kind, targets):
    """MoRe or peft LoRA adapters on `targets`, their zero factor made random so that they change the
    output (a path that left them out would show)."""
    if kind == "more":
        import shammie.more as more

        more.apply(model, more.MoReConfig(target_modules=targets, nblocks=4, blk_r=2))
        zero_factors = [m.R for m in model.modules() if isinstance(m, more.MoReLinear)]
    else:
        peft = pytest.importorskip("peft")
        targets = [t for t in targets if t != "out_proj"]   # peft refuses out_proj on Mamba models for this reason
        model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=targets))
        zero_factors = [p for name, p in model.named_parameters() if "lora_B" in name]
    with torch.no_grad():
        for factor in zero_factors:
            factor.normal_(0, 0.2, generator=torch.Generator().manual_seed(factor.numel()))
    return model


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["more", "lora"])
@pytest.mark.parametrize("build,targets", [(tiny_mamba, ["in_proj", "x_proj", "out_proj"]),
                                           (tiny_mamba2, ["in_proj", "out_proj"])], ids=["mamba", "mamba2"])
def test_adapters_on_the_projections_train_as_without_shammie(build, targets, kind, device):
    """transformers' fused training paths take x_proj's and out_proj's weights, not the modules: with an
    adapter there, shammie's entry points send them to the unfused path, which calls the adapters. Loss
    and adapter gradients equal transformers' own torch path."""
    model = with_adapters(build(device), kind, targets).train()
    skip_if_ungrouped_gated_norm(model)
    ids = tokens(device)
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        return loss.detach(), dict(zip(trained, torch.autograd.grad(loss, list(trained.values()))))

    loss_ref, grads_ref = step()
    with use_shammie_kernels():
        loss, grads = step()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_ref[name], rtol=2e-3, atol=2e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("build", [tiny_mamba, tiny_mamba2], ids=["mamba", "mamba2"])
@pytest.mark.parametrize("adapters", [False, True], ids=["", "MoRe on x_proj and out_proj"])
def test_training_step_compiles_fullgraph(adapters, build):
    """A training step of the whole model under torch.compile(fullgraph=True) through shammie's entry
    points gives transformers' eager loss and gradients. Under compile the adapter check reads MoRe's
    mark on the base weights (Dynamo cannot inspect the calling frame); a deep copy keeps the mark."""
    import copy

    model = build("cpu").train()
    if adapters:
        model = copy.deepcopy(with_adapters(model, "more", ["in_proj", "x_proj", "out_proj"]))
    ids = tokens("cpu")
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}

    def step(fn):
        loss = fn(ids)
        return loss.detach(), dict(zip(trained, torch.autograd.grad(loss, list(trained.values()))))

    loss_ref, grads_ref = step(lambda ids: model(input_ids=ids, labels=ids).loss)
    torch._dynamo.reset()
    with use_shammie_kernels():
        loss, grads = step(torch.compile(lambda ids: model(input_ids=ids, labels=ids).loss, fullgraph=True))
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_ref[name], rtol=2e-3, atol=2e-5, msg=lambda m: f"{name}: {m}")


def test_an_adapter_on_dt_proj_is_a_clear_error():
    """transformers' Mamba mixer reads dt_proj.weight in both of its paths, so an adapter there would be
    left out: MoRe refuses to put one there, and training through shammie's entry point refuses one
    that another library put there."""
    with pytest.raises(ValueError, match="'backbone.layers.0.mixer.dt_proj' is a Mamba mixer's dt_proj"):
        with_adapters(tiny_mamba("cpu"), "more", ["dt_proj"])
    model = with_adapters(tiny_mamba("cpu"), "lora", ["dt_proj"]).train()
    ids = tokens("cpu")
    with use_shammie_kernels(), pytest.raises(NotImplementedError, match="dt_proj carries an adapter"):
        model(input_ids=ids, labels=ids)


def cache_of(output):
    """The model output's cache: `cache` in transformers 5.2x, `cache_params` before (5.17)."""
    return output.cache if hasattr(output, "cache") else output.cache_params


def cache_kwarg(model, cache):
    """The forward argument that passes a cache, under either name."""
    import inspect

    return {"cache" if "cache" in inspect.signature(model.forward).parameters else "cache_params": cache}


def skip_if_ungrouped_gated_norm(model):
    """transformers before the fix (5.17 here; 5.24 has it) normalizes Mamba-2's gated RMSNorm over all
    n_groups at once in its torch path, unlike mamba_ssm and its own CUDA path; the fused training entry
    that shammie runs follows mamba_ssm (per group), so the two cannot agree there."""
    if any(getattr(m, "n_groups", 1) > 1 and hasattr(getattr(m, "norm", None), "weight")
           and not hasattr(m.norm, "group_size") for m in model.modules()):
        pytest.skip("this transformers normalizes Mamba-2's gated RMSNorm across groups (fixed in later releases)")


@pytest.mark.parametrize("device", DEVICES)
def test_mamba2_prefill_logits_match(device):
    """No cache, a cache to fill (final states), and a second chunk on a filled cache (initial states)."""
    model, ids = tiny_mamba2(device).eval(), tokens(device)
    with torch.no_grad():
        expected = model(ids).logits
        first = model(ids[:, :20], use_cache=True)
        expected_next = model(ids[:, 20:], **cache_kwarg(model, cache_of(first)), use_cache=True).logits
        with use_shammie_kernels():
            got, called = ops_called(lambda: model(ids).logits)
            cached = model(ids[:, :20], use_cache=True)
            got_next = model(ids[:, 20:], **cache_kwarg(model, cache_of(cached)), use_cache=True).logits
    assert {"shammie::causal_conv1d", "shammie::ssd_scan"} <= called
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cached.logits, first.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_next, expected_next, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("build", [tiny_mamba, tiny_mamba2], ids=["mamba", "mamba2"])
def test_generate_matches(build, device):
    model, ids = build(device).eval(), tokens(device, length=12)
    kwargs = dict(max_new_tokens=10, do_sample=False, output_scores=True, return_dict_in_generate=True,
                  pad_token_id=0)
    expected = model.generate(ids, **kwargs)
    with use_shammie_kernels():
        got, called = ops_called(lambda: model.generate(ids, **kwargs))
    assert {"shammie::causal_conv1d_update", "shammie::selective_state_update"} <= called
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.scores, expected.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("build", [tiny_mamba, tiny_mamba2], ids=["mamba", "mamba2"])
def test_generate_under_bf16_autocast_matches(build):
    """Under autocast the cache's conv state is bf16 while the conv weight stays fp32 (it used to raise)."""
    model, ids = build("cpu").eval(), tokens("cpu", length=9)
    kwargs = dict(max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True,
                  pad_token_id=0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model.generate(ids, **kwargs)
        with use_shammie_kernels():
            got, called = ops_called(lambda: model.generate(ids, **kwargs))
    assert "shammie::causal_conv1d_update" in called
    # bf16 rounding differs between the two paths, so greedy tokens may part at a near tie: compare the
    # scores of the steps up to the first token where the sequences differ (a few bf16 ulps apart).
    same = (got.sequences == expected.sequences).all(0)[ids.shape[1]:].tolist() + [False]
    steps = same.index(False) + 1
    for a, b in zip(got.scores[:steps], expected.scores[:steps]):
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05)


def test_patch_is_undone():
    assert not is_patched()
    with use_shammie_kernels():
        assert is_patched()
    assert not is_patched()
    patch = use_shammie_kernels()
    assert is_patched()
    patch.restore()
    assert not is_patched()


def test_overlapping_patches_restored_in_any_order():
    import transformers.models.mamba2.modeling_mamba2 as mm2
    original = mm2.mamba2_chunk_scan
    first, second = use_shammie_kernels(), use_shammie_kernels()
    first.restore()   # out of order: the second handle is still live
    assert is_patched()
    first.restore()   # twice is harmless
    with use_shammie_kernels():
        second.restore()
        assert is_patched()
    assert not is_patched() and mm2.mamba2_chunk_scan is original


def test_mamba2_wrappers_pass_packed_sequences_through():
    """transformers' names for the Mamba-2 kernels take mamba_ssm's seq_idx / cu_seqlens arguments."""
    import shammie
    from shammie.integrations import transformers as wrappers

    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(1, 20, 2, 3, generator=g), torch.randn(1, 20, 2, 3, generator=g)
    dt = torch.randn(1, 20, 2, generator=g)
    B, C = torch.randn(1, 20, 1, 4, generator=g), torch.randn(1, 20, 1, 4, generator=g)
    A, cu_seqlens = -torch.rand(2, generator=g), torch.tensor([0, 7, 20])
    seq_idx = torch.repeat_interleave(torch.arange(2), torch.tensor([7, 13]))[None].int()
    got = wrappers.mamba2_chunk_scan(x, dt, A, B, C, 16, z=z, dt_softplus=True, seq_idx=seq_idx,
                                     cu_seqlens=cu_seqlens, return_varlen_states=True)
    want = shammie.mamba_chunk_scan_combined(x, dt, A, B, C, 16, z=z, dt_softplus=True, seq_idx=seq_idx,
                                             cu_seqlens=cu_seqlens, return_varlen_states=True)
    alone = shammie.mamba_chunk_scan_combined(x[:, 7:], dt[:, 7:], A, B[:, 7:], C[:, 7:], 16, z=z[:, 7:],
                                              dt_softplus=True, return_final_states=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(got[0][:, 7:], alone[0])
    torch.testing.assert_close(got[1][1], alone[1][0])
    conv_x, weight = torch.randn(1, 6, 20, generator=g), torch.randn(6, 4, generator=g)
    torch.testing.assert_close(wrappers.causal_conv1d_fn(conv_x, weight, seq_idx=seq_idx)[..., 7:],
                               shammie.causal_conv1d_fn(conv_x[..., 7:], weight))



def test_wrappers_refuse_packing_arguments_they_cannot_honour():
    """cu_seqlens reaches the conv and the fused mixer only through **kwargs: refused, not ignored."""
    from shammie.integrations import transformers as wrappers

    with pytest.raises(NotImplementedError, match=r"packed sequences \(cu_seqlens=...\)"):
        wrappers.causal_conv1d_fn(torch.randn(1, 4, 6), torch.randn(4, 3), cu_seqlens=torch.tensor([0, 6]))
    with pytest.raises(NotImplementedError, match=r"packed sequences \(cu_seqlens=...\)"):
        wrappers.mamba2_split_conv1d_scan_combined(torch.randn(1, 6, 2 * 8 + 2 * 4 + 2), torch.randn(16, 4), None,
                                                   torch.zeros(2), -torch.ones(2), torch.ones(2), 16, headdim=4,
                                                   cu_seqlens=torch.tensor([0, 6]))


def test_dp_example_runs():
    """examples/dp_per_sample_gradients.py: per-sample gradients by vmap equal a loop of backward passes,
    and DP-SGD runs."""
    import re

    result = run_example("dp_per_sample_gradients.py", "--steps", 3, "--batch", 4, "--device", "cpu", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    gap = re.search(r"max \|vmap - loop\| = (\S+)", result.stdout)
    assert gap and float(gap.group(1)) < 1e-6, result.stdout
    assert "DP-SGD, clip 1.0" in result.stdout, result.stdout


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_manual_decode_in_grad_mode_matches_transformers(family):
    """A prefill in grad mode leaves a cache that requires grad; the decode steps must still run
    (transformers' own path does), not refuse the state."""
    torch.manual_seed(0)
    if family == "mamba":
        model = transformers.MambaForCausalLM(transformers.MambaConfig(
            vocab_size=50, hidden_size=16, state_size=4, num_hidden_layers=1, expand=2, conv_kernel=4)).eval()
    else:
        model = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
            vocab_size=50, hidden_size=16, state_size=8, num_hidden_layers=1, expand=2, head_dim=8, num_heads=4,
            n_groups=1, chunk_size=4, conv_kernel=4)).eval()
    ids = torch.randint(0, 50, (1, 5))

    def decode():
        out = model(ids, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        out = model(token, cache=out.cache, use_cache=True)
        return model(token, cache=out.cache, use_cache=True).logits

    expected = decode()
    with use_shammie_kernels():
        torch.testing.assert_close(decode(), expected, rtol=1e-4, atol=1e-5)
