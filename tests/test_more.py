"""MoRe adapters: injection, freezing, ΔW, merge/unmerge, save/load, Conv1D, training, bad configs."""

import math

import pytest
import torch

import shammie.more as more
from shammie.more.layer import adapts
from shammie.reference.monarch import monarch_reference
from conftest import run_example

transformers = pytest.importorskip("transformers")


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=16, vocab_size=50)
    return transformers.GPT2LMHeadModel(config).eval()


def tiny_bert_classifier(seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                     intermediate_size=48, vocab_size=50, max_position_embeddings=16, num_labels=3)
    return transformers.BertForSequenceClassification(config).eval()


def randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in model.named_modules():
            if isinstance(m, more.MoReLinear):
                m.R.copy_(torch.randn(m.R.shape, generator=g) * 0.1)


def test_injects_by_name_and_by_regex():
    model = more.apply(tiny_gpt2(), more.MoReConfig(target_modules=["c_attn", "c_proj"]))
    names = sorted(n for n, m in model.named_modules() if isinstance(m, more.MoReLinear))
    assert names == [f"transformer.h.{i}.{p}" for i in range(2) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_proj")]
    model = more.apply(tiny_bert_classifier(), more.MoReConfig(target_modules=r".*attention\.self\.(query|value)"))
    names = [n for n, m in model.named_modules() if isinstance(m, more.MoReLinear)]
    assert len(names) == 4 and all(n.endswith(("query", "value")) for n in names)


def test_applying_twice_never_wraps_a_wrapped_layer():
    config = more.MoReConfig(target_modules=r".*c_attn.*")   # also matches ...c_attn.base_layer
    model = more.apply(more.apply(tiny_gpt2(), config), config)
    adapted = [n for n, m in model.named_modules() if isinstance(m, more.MoReLinear)]
    assert adapted == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]


def test_parameter_count_and_geometry():
    # Uneven sizes: in=10, out=7, nblocks=4 -> in_blksz=3, nblocks=ceil(10/3)=4, out_blksz=ceil(3·7/10)=3.
    layer = more.MoReLinear(torch.nn.Linear(10, 7), nblocks=4, blk_r=2)
    assert (layer.nblocks, layer.blk_r, layer.in_blksz, layer.out_blksz) == (4, 2, 3, 3)
    assert layer.L.shape == (4, 2, 3) and layer.R.shape == (4, 3, 2)
    assert layer.adapter_parameters == 4 * 2 * (3 + 3) == layer.L.numel() + layer.R.numel()
    square = more.MoReLinear(torch.nn.Linear(16, 16), nblocks=4, square=True)
    assert square.blk_r == square.in_blksz == 4
    model = more.apply(tiny_gpt2(), more.MoReConfig(target_modules=["c_attn"], nblocks=4, blk_r=4))
    count = more.trainable_parameters(model)
    # c_attn: 32 -> 96: in_blksz 8, out_blksz 24, 4·4·(8+24) = 512 per layer.
    assert count.adapter == count.trainable == 2 * 512
    assert math.isclose(count.lora_rank_equivalent, 1024 / (2 * (32 + 96)))
    assert 0 < count.percent < 100 and "trainable%" in str(count)


def test_starts_as_the_base_model_and_the_adapter_matches_the_math():
    base = tiny_gpt2()
    ids = torch.randint(0, 50, (2, 9))
    expected = base(ids).logits
    model = more.apply(tiny_gpt2(), more.MoReConfig(target_modules=["c_attn", "c_fc"]))
    torch.testing.assert_close(model(ids).logits, expected)            # R = 0 at init
    layer = model.transformer.h[0].mlp.c_fc                               # a Conv1D: weight (in, out)
    randomize_adapters(model)
    x = torch.randn(5, layer.in_features)
    padded = torch.nn.functional.pad(x, (0, layer.nblocks * layer.in_blksz - layer.in_features)).double()
    delta = monarch_reference(padded, layer.L.double(), layer.R.double())[:, : layer.out_features]
    dense = x.double() @ layer.base_layer.weight.double() + layer.base_layer.bias.double() + delta
    torch.testing.assert_close(layer(x).double(), dense, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_adapted_model_on_cuda_matches_cpu(dtype):
    model = more.apply(tiny_gpt2(), more.MoReConfig(target_modules=["c_attn", "c_fc"]))
    randomize_adapters(model)
    ids = torch.randint(0, 50, (2, 9))
    expected = model(ids).logits
    got = model.to("cuda", dtype)(ids.cuda()).logits.float().cpu()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


def test_delta_weight_equals_the_dense_product():
    layer = more.MoReLinear(torch.nn.Linear(10, 7), nblocks=4, blk_r=2)
    randomize_adapters(torch.nn.ModuleList([layer]))
    x = torch.randn(6, 10)
    torch.testing.assert_close(x @ layer.delta_weight_t(), layer.adapter(x), rtol=1e-5, atol=1e-6)


def test_per_sample_gradients_with_torch_func():
    """Differentially private fine-tuning needs each example's adapter gradient: vmap over grad through
    a MoReLinear (shammie/_functorch.py), as Opacus' functorch mode does."""
    layer = more.MoReLinear(torch.nn.Linear(12, 9), nblocks=4, blk_r=2).double()
    randomize_adapters(torch.nn.ModuleList([layer]))
    params = {"L": layer.L.detach(), "R": layer.R.detach()}   # the others stay the module's own
    x = torch.randn(5, 3, 12, dtype=torch.float64)

    def loss(params, example):
        return torch.func.functional_call(layer, params, (example[None],)).square().sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    assert set(per_sample) == {"L", "R"}
    for i in range(x.shape[0]):
        layer.zero_grad()
        layer(x[i:i + 1]).square().sum().backward()
        for name, got in per_sample.items():
            torch.testing.assert_close(got[i], getattr(layer, name).grad)


def test_only_adapters_train_and_base_weights_stay():
    model = more.apply(tiny_bert_classifier(), more.MoReConfig(target_modules=["query", "value"], modules_to_save=["classifier"]))
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".L", ".R")) or n.startswith("classifier.") for n in trainable)
    assert any(n.startswith("classifier.") for n in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out = model(torch.randint(0, 50, (4, 8)), labels=torch.tensor([0, 1, 2, 0]))
    out.loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in trainable), name
    optimizer.step()
    for name, before in frozen.items():
        assert torch.equal(dict(model.named_parameters())[name], before), name


def test_bias_all_trains_biases():
    model = more.apply(tiny_gpt2(), more.MoReConfig(target_modules=["c_attn"], bias="all"))
    assert all(p.requires_grad for n, p in model.named_parameters() if n.endswith("bias"))


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_bert_classifier])
def test_merge_unmerge_round_trip(make):
    model = more.apply(make(), more.MoReConfig(target_modules=["c_attn", "c_proj", "query", "dense"], dropout=0.1))
    randomize_adapters(model)
    model.eval()
    ids = torch.randint(0, 50, (2, 8))
    out = lambda: model(ids).logits
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    adapted = out()
    layers = [m for m in model.modules() if isinstance(m, more.MoReLinear)]
    # The mark that tells code reading a layer's weight that an adapter adds to it (shammie.more.layer.adapts)
    assert all(adapts(m.weight) and m.weight is m.base_layer.weight for m in layers)
    more.merge(model)
    assert not any(adapts(m.weight) for m in layers)
    torch.testing.assert_close(out(), adapted, rtol=1e-4, atol=1e-5)
    more.unmerge(model)
    assert all(adapts(m.weight) for m in layers)
    for name, p in model.named_parameters():
        if name in before:
            torch.testing.assert_close(p, before[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(out(), adapted, rtol=1e-5, atol=1e-6)
    plain = more.merge_and_unload(model)
    assert not any(isinstance(m, more.MoReLinear) for m in plain.modules())
    torch.testing.assert_close(plain(ids).logits, adapted, rtol=1e-4, atol=1e-5)


def test_tied_lm_head_trains_when_saved_and_refuses_to_merge(tmp_path):
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    more.apply(model, more.MoReConfig(target_modules=["c_attn"], modules_to_save=["lm_head"]))
    assert model.lm_head.weight.requires_grad   # named_parameters() lists it only as transformer.wte.weight
    with torch.no_grad():
        model.lm_head.weight.add_(0.5)
    more.save_adapter(model, tmp_path)
    ids = torch.randint(0, 50, (2, 8))
    torch.testing.assert_close(more.load_adapter(tiny_gpt2(), tmp_path)(ids).logits, model(ids).logits)

    model = more.apply(tiny_gpt2(), more.MoReConfig(target_modules=["lm_head"]))
    randomize_adapters(model)
    embedding = model.transformer.wte.weight.detach().clone()
    for fold in (more.merge, more.merge_and_unload):   # ΔW on lm_head would land in the input embedding too
        with pytest.raises(ValueError, match="'lm_head'.*tied to \\['transformer.wte.weight'\\]"):
            fold(model)
        assert torch.equal(model.transformer.wte.weight, embedding) and not model.lm_head.merged


def test_applying_two_configs_saves_and_loads_both(tmp_path):
    model = tiny_gpt2()
    more.apply(model, more.MoReConfig(target_modules=["c_attn"], nblocks=4, blk_r=2))
    more.apply(model, more.MoReConfig(target_modules=["c_fc"], nblocks=2, blk_r=4, modules_to_save=["ln_f"]))
    assert model.transformer.h[0].attn.c_attn.nblocks == 4 and model.transformer.h[0].mlp.c_fc.nblocks == 2
    assert model.transformer.h[0].attn.c_attn.L.requires_grad and model.transformer.ln_f.weight.requires_grad
    randomize_adapters(model)
    more.save_adapter(model, tmp_path)
    fresh = more.load_adapter(tiny_gpt2(), tmp_path)
    ids = torch.randint(0, 50, (2, 8))
    assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_save_load_round_trip_is_exact(tmp_path):
    config = more.MoReConfig(target_modules=["query", "value"], modules_to_save=["classifier"], nblocks=2, blk_r=3)
    model = more.apply(tiny_bert_classifier(), config)
    randomize_adapters(model)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    more.save_adapter(model, tmp_path)
    assert (tmp_path / "adapter_config.json").exists() and (tmp_path / "adapter_model.safetensors").exists()
    fresh = more.load_adapter(tiny_bert_classifier(), tmp_path)
    ids = torch.randint(0, 50, (3, 8))
    assert torch.equal(fresh(ids).logits, model(ids).logits)
    other = more.apply(tiny_bert_classifier(), more.MoReConfig(target_modules=["query"]))
    with pytest.raises(ValueError, match="does not fit this model"):
        more.load_adapter(other, tmp_path)
    merged = more.merge(more.load_adapter(tiny_bert_classifier(), tmp_path))
    with pytest.raises(ValueError, match="unmerge the model before loading"):
        more.load_adapter(merged, tmp_path)   # unmerge would then subtract the wrong ΔW


def test_training_lowers_the_loss():
    torch.manual_seed(0)
    model = more.apply(tiny_bert_classifier(), more.MoReConfig(target_modules=["query", "value", "dense"], modules_to_save=["classifier"]))
    model.train()
    ids = torch.randint(3, 50, (64, 8))
    labels = torch.randint(0, 3, (64,))
    ids[:, 0] = labels            # the label is the first token: learnable through attention
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = model(ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses


@pytest.mark.parametrize("kwargs, message", [
    (dict(target_modules=["c_attn"], blk_r=0), "blk_r must be a positive integer"),
    (dict(target_modules=["c_attn"], nblocks=0), "nblocks must be a positive integer"),
    (dict(target_modules=["c_attn"], dropout=1.5), r"dropout must be in \[0, 1\)"),
    (dict(target_modules=["c_attn"], bias="lora_only"), "bias must be 'none' or 'all'"),
    (dict(target_modules=[]), "target_modules must be a non-empty list"),
    (dict(target_modules="("), "not a valid regular expression"),
])
def test_bad_config_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        more.MoReConfig(**kwargs)


def test_impossible_layers_are_clear_errors():
    with pytest.raises(ValueError, match="no nn.Linear or Conv1D module matches"):
        more.apply(tiny_gpt2(), more.MoReConfig(target_modules=["does_not_exist"]))
    with pytest.raises(ValueError, match=r"nblocks=64 is more than in_features=32 \(module 'transformer.h.0.attn.c_attn'\)"):
        more.apply(tiny_gpt2(), more.MoReConfig(target_modules=["c_attn"], nblocks=64))
    with pytest.raises(TypeError, match="MoRe adapts nn.Linear and transformers' Conv1D"):
        more.MoReLinear(torch.nn.Conv2d(3, 3, 1))


def test_finetune_example_runs(tmp_path):
    pytest.importorskip("peft")
    result = run_example("more_finetune.py", "--steps", 3, "--lrs", "1e-3", "--device", "cpu", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith(("GPT-2", "BERT"))]
    assert len(rows) == 4 and sum("MoRe" in r for r in rows) == 2 and sum("LoRA" in r for r in rows) == 2
