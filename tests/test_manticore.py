"""shammie.manticore: hybrids of HF GPT-2 / GPT-NeoX / Mamba / Mamba2 models built offline from configs. One-hot α gives each
component's own logits bit for bit; each training phase moves only its parameters; α stays on the simplex;
save/load round-trips; mismatches fail clearly; the search prefers a component that knows the task."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("tqdm")

from shammie.integrations.transformers import use_shammie_kernels  # noqa: E402
from shammie.manticore import (  # noqa: E402
    ALPHA_MODES, PROJECTORS, ExponentiatedGradient, Manticore, finetune, pretrain_projectors, search)
from conftest import DEVICES  # noqa: E402

V = 61


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models are tiny: on a shared CPU, extra intra-op threads cost far more than they give."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gpt2(seed=0, vocab=V, layers=4, width=32):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=layers, n_embd=width, n_head=4, n_positions=64, vocab_size=vocab,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def mamba(seed=1, vocab=V, layers=4, width=48):
    torch.manual_seed(seed)
    config = transformers.MambaConfig(vocab_size=vocab, hidden_size=width, state_size=8, num_hidden_layers=layers,
                                      expand=2, conv_kernel=4, time_step_rank=4)
    return transformers.MambaForCausalLM(config)


def mamba2(seed=4, vocab=V, layers=3, width=32):
    torch.manual_seed(seed)
    config = transformers.Mamba2Config(vocab_size=vocab, hidden_size=width, state_size=16, num_hidden_layers=layers,
                                       expand=2, head_dim=16, num_heads=4, n_groups=2, conv_kernel=4, chunk_size=16)
    return transformers.Mamba2ForCausalLM(config)


def neox(seed=2, vocab=V):
    torch.manual_seed(seed)
    config = transformers.GPTNeoXConfig(vocab_size=vocab, hidden_size=40, num_hidden_layers=3, num_attention_heads=4,
                                        intermediate_size=80, max_position_embeddings=64, hidden_dropout=0.0,
                                        attention_dropout=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPTNeoXForCausalLM(config)


def tokens(device, batch=2, length=23, seed=3, vocab=V):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed)).to(device)


def one_hot(k, m, i):
    return [[float(j == i) for j in range(m)] for _ in range(k)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("training", [False, True])
def test_one_hot_alpha_gives_each_components_logits_exactly(device, dtype, training):
    models = [m.to(device=device, dtype=dtype).train(training) for m in (gpt2(), mamba(), neox(), mamba2())]
    hybrid = Manticore.from_models(models, n_mixtures=3, projector="linear_skip").train(training)
    ids = tokens(device)
    for i, model in enumerate(models):
        hybrid.program(one_hot(3, 4, i))
        with torch.no_grad(), use_shammie_kernels():
            expected = model(ids).logits
        with torch.no_grad():
            got, _ = hybrid(ids)
        assert got.dtype == expected.dtype
        assert torch.equal(got, expected), f"model {i}: max diff {(got.float() - expected.float()).abs().max()}"


def test_one_hot_with_hf_fallback_path_matches_plain_model():
    models = [gpt2(), mamba()]
    hybrid = Manticore.from_models(models, n_mixtures=2, shammie_kernels=False).eval()
    ids = tokens("cpu")
    hybrid.program(one_hot(2, 2, 1))
    with torch.no_grad():
        assert torch.equal(hybrid(ids)[0], models[1].eval()(ids).logits)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("projector", PROJECTORS)
def test_one_hot_bypasses_projectors(device, projector):
    """Programmed one-hot rows skip the projectors even when they are far from identity."""
    models = [gpt2().to(device).eval(), mamba().to(device).eval()]
    hybrid = Manticore.from_models(models, n_mixtures=2, projector=projector).eval()
    with torch.no_grad():
        for p in hybrid.projector_parameters():
            p.normal_()
    hybrid.program(one_hot(2, 2, 0))
    ids = tokens(device)
    with torch.no_grad():
        assert torch.equal(hybrid(ids)[0], models[0](ids).logits)


@pytest.mark.parametrize("projector", ["linear", "linear_skip"])
def test_identity_projectors_and_trainable_one_hot_match_programmed(projector):
    """The general (unprogrammed) path with α one-hot computes the same logits as the bypass."""
    models = [gpt2().eval(), mamba().eval()]
    hybrid = Manticore.from_models(models, n_mixtures=2, projector=projector).eval()
    ids = tokens("cpu")
    with torch.no_grad():
        hybrid.alpha.copy_(torch.tensor([[0.0, float("-inf")]] * 2))
        general, _ = hybrid(ids)
        hybrid.program(one_hot(2, 2, 0))
        programmed, _ = hybrid(ids)
    torch.testing.assert_close(general, programmed, rtol=0, atol=0)


def test_mixed_program_runs_blocks_of_both_models_bf16():
    models = [m.to(torch.bfloat16).eval() for m in (gpt2(), mamba())]
    hybrid = Manticore.from_models(models, n_mixtures=2, projector="two_layer").eval()
    assert hybrid.alpha.dtype == torch.float32
    ids = tokens("cpu")
    with torch.no_grad():
        for alphas in ([[1.0, 0.0], [0.0, 1.0]], [[0.3, 0.7], [0.5, 0.5]]):
            hybrid.program(alphas)
            logits, loss = hybrid(ids, ids)
            assert logits.shape == (2, 23, V) and torch.isfinite(logits).all() and torch.isfinite(loss)
        hybrid.unprogram()
        logits, _ = hybrid(ids)
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize("device", DEVICES)
def test_mamba2_hybrid_trains_on_the_ssd_kernels(device):
    """A GPT-2 + Mamba2 hybrid with soft α: the Mamba2 blocks run shammie's SSD scan forward and
    backward, and the loss reaches α, the projectors and both models."""
    hybrid = Manticore.from_models([gpt2().to(device), mamba2().to(device)], n_mixtures=3).train()
    ids = tokens(device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _, loss = hybrid(ids, ids)
        loss.backward()
    called = {e.name for e in prof.events()}
    assert {"shammie::ssd_scan", "shammie::ssd_scan_backward"} <= called
    assert torch.isfinite(loss)
    for part in (hybrid.alpha_parameters(), hybrid.projector_parameters(), hybrid.model_parameters()):
        grads = [p.grad for p in part if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads)


def _loader(device, n=4, batch=4, length=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (batch, length), generator=g).to(device) for _ in range(n)]


def _snapshot(hybrid):
    return {"models": [p.detach().clone() for p in hybrid.model_parameters()],
            "projectors": [p.detach().clone() for p in hybrid.projector_parameters()],
            "alpha": [p.detach().clone() for p in hybrid.alpha_parameters()]}


def _changed(hybrid, before):
    after = _snapshot(hybrid)
    return {part for part in before if any(not torch.equal(a, b) for a, b in zip(before[part], after[part]))}


def _fresh(device="cpu", **kwargs):
    return Manticore.from_models([gpt2().to(device), mamba().to(device)], n_mixtures=2, **kwargs)


@pytest.mark.parametrize("device", DEVICES)
def test_each_phase_trains_only_its_parameters(device):
    hybrid = _fresh(device)
    before = _snapshot(hybrid)
    pretrain_projectors(hybrid, _loader(device), steps=2, progress=False)
    assert _changed(hybrid, before) == {"projectors"}

    before = _snapshot(hybrid)
    history = search(hybrid, _loader(device), _loader(device, seed=1), steps=2, progress=False)
    assert _changed(hybrid, before) == {"projectors", "alpha"}
    assert len(history["alpha"]) == 2 and len(history["val_loss"]) == 2

    before = _snapshot(hybrid)
    finetune(hybrid, _loader(device), steps=2, train=("projectors",), progress=False)
    assert _changed(hybrid, before) == {"projectors"}
    assert hybrid.programmed    # finetune fixed α at its searched value

    before = _snapshot(hybrid)
    finetune(hybrid, _loader(device), steps=2, progress=False)
    assert _changed(hybrid, before) == {"models", "projectors"}


def test_finetune_rejects_unknown_parts():
    with pytest.raises(ValueError, match="train must name"):
        finetune(_fresh(), _loader("cpu"), steps=1, train=("alpha",), progress=False)


@pytest.mark.parametrize("mode", ALPHA_MODES)
def test_alpha_stays_on_simplex(mode):
    hybrid = _fresh(alpha_mode=mode, tau=0.5)
    history = search(hybrid, _loader("cpu"), _loader("cpu", seed=1), steps=4, alpha_lr=0.5, progress=False)
    for training in (True, False):
        hybrid.train(training)
        a = hybrid.mixture_weights().detach()
        assert (a >= 0).all()
        torch.testing.assert_close(a.sum(-1), torch.ones(2), rtol=0, atol=1e-6)
    for a in history["alpha"]:
        a = torch.tensor(a)
        assert (a >= 0).all() and torch.allclose(a.sum(-1), torch.ones(2), atol=1e-6)
    assert history["alpha"][0] != history["alpha"][-1]
    if mode == "gaea":   # the parameter itself is α
        assert torch.allclose(hybrid.alpha.detach().sum(-1), torch.ones(2), atol=1e-6)


def test_exponentiated_gradient_step():
    p = torch.nn.Parameter(torch.tensor([[0.25, 0.75]]))
    p.grad = torch.tensor([[1.0, -1.0]])
    ExponentiatedGradient([p], lr=0.5).step()
    expected = torch.tensor([[0.25 * torch.e ** -0.5, 0.75 * torch.e ** 0.5]])
    torch.testing.assert_close(p.detach(), expected / expected.sum())


@pytest.mark.parametrize("programmed", [False, True])
def test_save_load_round_trip(tmp_path, programmed):
    hybrid = _fresh(projector="two_layer", alpha_mode="gaea")
    search(hybrid, _loader("cpu"), _loader("cpu", seed=1), steps=2, progress=False)
    if programmed:
        hybrid.program([[0.2, 0.8], [1.0, 0.0]])
    hybrid.eval()
    hybrid.save(tmp_path)
    loaded = Manticore.load(tmp_path).eval()
    assert loaded.config == hybrid.config and loaded.programmed == programmed
    ids = tokens("cpu")
    with torch.no_grad():
        assert torch.equal(loaded(ids)[0], hybrid(ids)[0])
    state, loaded_state = hybrid.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)


def test_vocab_mapping():
    small, big = gpt2(vocab=V), mamba(vocab=V + 11)
    with pytest.raises(ValueError, match=r"vocabularies differ \(model 0 \(gpt2\): 61, model 1 \(mamba\): 72\)"):
        Manticore.from_models([small, big], n_mixtures=2)
    hybrid = Manticore.from_models([small, big], n_mixtures=2, vocab_maps=[None, list(range(V))]).eval()
    assert hybrid.vocab_size == V
    ids = tokens("cpu")
    hybrid.program(one_hot(2, 2, 1))
    with torch.no_grad(), use_shammie_kernels():
        expected = big.eval()(ids).logits[..., :V]
        assert torch.equal(hybrid(ids)[0], expected)
    # a permuted map: shared token t is model-1 token perm[t]
    perm = torch.randperm(V + 11, generator=torch.Generator().manual_seed(0))[:V]
    hybrid = Manticore.from_models([small, big], n_mixtures=2, vocab_maps=[None, perm.tolist()]).eval()
    hybrid.program(one_hot(2, 2, 1))
    with torch.no_grad(), use_shammie_kernels():
        expected = big(perm[ids]).logits[..., perm]
        assert torch.equal(hybrid(ids)[0], expected)


@pytest.mark.parametrize("kwargs, match", [
    (dict(vocab_maps=[None]), r"vocab_maps has 1 entries, expected one per model \(2\)"),
    (dict(vocab_maps=[None, list(range(V - 1))]), "different shared vocabulary sizes"),
    (dict(vocab_maps=[None, [0] * (V - 1) + [V]]), r"vocab_maps\[1\] holds ids outside model 1's vocabulary"),
    (dict(n_mixtures=5), r"model 0 \(gpt2\) has 4 layers, fewer than n_mixtures=5"),
    (dict(n_mixtures=0), "n_mixtures must be a positive int"),
    (dict(projector="mlp"), "projector must be one of"),
    (dict(alpha_mode="darts"), "alpha_mode must be one of"),
    (dict(tau=0.0), "tau must be > 0"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Manticore.from_models([gpt2(), mamba()], **{"n_mixtures": 2, **kwargs})


def test_unsupported_model():
    bert = transformers.BertForMaskedLM(transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                                num_attention_heads=4, intermediate_size=64))
    with pytest.raises(TypeError, match=r"unsupported model BertForMaskedLM \(config.model_type='bert'\)"):
        Manticore.from_models([gpt2(), bert], n_mixtures=2)
    with pytest.raises(TypeError, match="no LM head"):
        Manticore.from_models([transformers.GPT2Model(gpt2().config)], n_mixtures=2)


def test_input_and_program_errors():
    hybrid = _fresh()
    with pytest.raises(ValueError, match=r"input_ids must be a 2-D \(batch, length\) integer tensor, got shape \(5,\)"):
        hybrid(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor, got shape .* dtype torch.float32"):
        hybrid(torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"labels must have input_ids' shape \(2, 5\)"):
        hybrid(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, \d+\), got values from -1 to 0"):
        hybrid(torch.tensor([[0, -1]]))
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, (\d+)\), got values from 0 to \1"):
        hybrid(torch.tensor([[0, hybrid.vocab_size]]))
    with pytest.raises(ValueError, match=r"input_ids must be on the hybrid's device \(cpu\), got meta"):
        hybrid(torch.zeros(2, 5, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match=r"alphas must have shape \(n_mixtures, n_models\) = \(2, 2\), got \(2, 3\)"):
        hybrid.program(one_hot(2, 3, 0))
    with pytest.raises(ValueError, match="on the simplex"):
        hybrid.program([[0.5, 0.6], [1.0, 0.0]])
    with pytest.raises(ValueError, match="on the simplex"):
        hybrid.program([[1.5, -0.5], [1.0, 0.0]])


def test_labels_length_and_model_list_errors():
    hybrid = _fresh()
    ids = tokens("cpu")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 61\) or be -100 \(ignored\), got values from 1\d\d to 1\d\d"):
        hybrid(ids, ids + 100)
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        hybrid(ids, ids.float())
    with pytest.raises(ValueError, match=r"65 tokens per row, more than model 0 \(gpt2\) can embed \(64 positions\)"):
        hybrid(torch.zeros(1, 65, dtype=torch.long))
    for shape in ((0, 5), (2, 0)):
        with pytest.raises(ValueError, match="input_ids must be non-empty"):
            hybrid(torch.zeros(shape, dtype=torch.long))
    with pytest.raises(ValueError, match="pass at least one model"):
        Manticore.from_models([], n_mixtures=2)
    model = gpt2()
    with pytest.raises(ValueError, match="same model object is passed twice"):
        Manticore.from_models([model, model], n_mixtures=2)
    assert Manticore.from_models([gpt2(), mamba()], n_mixtures=torch.tensor(2).numpy()).config.n_mixtures == 2


def test_int32_batches_train_like_int64():
    ids = tokens("cpu")
    losses = [_fresh()(ids.to(dtype), ids.to(dtype))[1] for dtype in (torch.long, torch.int32)]
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    pretrain_projectors(_fresh(), [ids.int()], steps=1, progress=False)


def test_save_load_keeps_dtypes_attention_and_tensor_vocab_maps(tmp_path):
    hybrid = Manticore.from_models([gpt2().bfloat16(), mamba().bfloat16()], n_mixtures=2,
                                   vocab_maps=[None, torch.arange(V)]).eval()
    hybrid.models[0].config._attn_implementation = "eager"
    hybrid.save(tmp_path)
    loaded = Manticore.load(tmp_path).eval()
    assert {p.dtype for p in loaded.parameters() if p is not loaded.alpha} == {torch.bfloat16}
    assert loaded.models[0].config._attn_implementation == "eager"
    ids = tokens("cpu")
    with torch.no_grad():
        assert torch.equal(loaded(ids)[0], hybrid(ids)[0])


def test_search_takes_one_pass_over_train_loader_and_refuses_empty_loaders():
    history = search(_fresh(), _loader("cpu", n=5), _loader("cpu", n=1, seed=1), progress=False)
    assert len(history["loss"]) == 5   # the one validation batch is reused
    with pytest.raises(ValueError, match="val_loader yields no batches"):
        search(_fresh(), _loader("cpu"), [], steps=2, progress=False)
    with pytest.raises(ValueError, match="loader yields no batches"):
        pretrain_projectors(_fresh(), [], steps=2, progress=False)


def test_training_projectors_alone_on_a_one_hot_hybrid_is_refused():
    hybrid = _fresh()
    hybrid.program(one_hot(2, 2, 0))
    for phase in (lambda: pretrain_projectors(hybrid, _loader("cpu"), steps=1, progress=False),
                  lambda: finetune(hybrid, _loader("cpu"), steps=1, train=("projectors",), progress=False)):
        with pytest.raises(ValueError, match="one-hot at every position, which bypasses the projectors"):
            phase()
    finetune(hybrid, _loader("cpu"), steps=1, train=("models", "projectors"), progress=False)


def test_alphas_table_and_discretize():
    hybrid = _fresh()
    with torch.no_grad():
        hybrid.alpha.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
    table = hybrid.alphas()
    assert "0:gpt2" in table and "1:mamba" in table and "0.8808" in table and "0-1/0-1" in table
    assert hybrid.discretize() == [0, 1]
    assert hybrid.programmed and "programmed" in hybrid.alphas()


def _count_up(device, n, batch=16, length=24, seed=0):
    """Each sequence counts up modulo V from a random start: next token = token + 1."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = torch.randint(0, V, (batch, 1), generator=g)
        out.append(((start + torch.arange(length)) % V).to(device))
    return out


def test_search_prefers_the_pretrained_component():
    trained = gpt2(layers=2, width=32)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-2)
    trained.train()
    for ids in _count_up("cpu", 40, batch=8, length=16):
        optimizer.zero_grad()
        trained(ids, labels=ids).loss.backward()
        optimizer.step()
    untrained = mamba(layers=2)
    hybrid = Manticore.from_models([untrained, trained], n_mixtures=2)
    history = search(hybrid, _count_up("cpu", 4, batch=8, length=16, seed=1),
                     _count_up("cpu", 4, batch=8, length=16, seed=2), steps=16, alpha_lr=0.2, progress=False)
    final = torch.tensor(history["alpha"][-1])
    assert (final[:, 1] > 0.65).all() and final[:, 1].mean() > 0.75, hybrid.alphas()
    assert history["val_loss"][-1] < history["val_loss"][0]


def test_bench_harness_takes_token_ids():
    """benchmarks.harness.measure with integer inputs (token ids get no requires_grad)."""
    from shammie.benchmarks.harness import Case, measure

    embedding = torch.nn.Embedding(V, 8)
    case = Case(op="embed", shape="tiny", dtype=torch.float32, make_inputs=lambda device: [tokens(device)],
                ours=embedding, peer=embedding, peer_name="itself", bytes_forward=1, bytes_backward=1,
                flops_forward=1.0, flops_backward=1.0)
    row = measure(case, torch.device("cpu"), min_run_time=0.001)
    assert row["ours_fwdbwd_s"] > 0 and row["peer_fwdbwd_s"] > 0


@pytest.mark.parametrize("ssm", ["mamba", "mamba2"])
def test_mad_example_runs(ssm):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, str(root / "examples" / "manticore_mad.py"), "--ssm", ssm,
                             "--component-steps", "3", "--projector-steps", "2", "--search-steps", "2",
                             "--finetune-steps", "2"], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "α trajectory during search" in result.stdout and "hybrid:" in result.stdout
    assert f"{ssm:<6} alone:" in result.stdout and "gpt2   alone:" in result.stdout
