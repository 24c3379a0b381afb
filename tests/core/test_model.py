import pytest
import torch
from jsonargparse import ArgumentError, ArgumentParser
from torch.utils.flop_counter import FlopCounterMode

from shakespeare_gpt.model import GPT, Block, GPTConfig
from shakespeare_gpt.utils import UserError

TINY = dict(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.0)

# Every switch of the ablation study, each flipped away from its default.
SWITCHES = [
    {},
    {"n_head": 1},
    {"feed_forward": False},
    {"attn_proj": False},
    {"residual": False},
    {"norm": "post"},
    {"norm": "none"},
    {"dropout": 0.3},
    {"activation": "gelu"},
    {"attention": "explicit"},
    {"tie_weights": True},
    {"n_layer": 1},
    {"n_layer": 0},  # the bigram baseline: embeddings and head only
]


def tiny(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**TINY, **overrides}))


def test_default_model_is_the_lectures():
    # The lecture's model reports 10.788929 M parameters with the 65-character vocabulary.
    assert GPT(GPTConfig()).num_parameters() == 10_788_929


@pytest.mark.parametrize("switch", SWITCHES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "default")
def test_every_switch_builds_runs_and_learns(switch):
    model = tiny(**switch)
    idx = torch.randint(0, 11, (3, 8))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 8, 11)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("switch", SWITCHES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "default")
def test_causality_future_tokens_do_not_change_earlier_logits(switch):
    model = tiny(**switch).eval()
    idx = torch.randint(0, 11, (2, 8))
    changed = idx.clone()
    changed[:, 5] = (idx[:, 5] + 1) % 11
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])


@pytest.mark.parametrize("norm", ["pre", "post", "none"])
def test_sdpa_and_explicit_attention_agree(norm):
    sdpa = tiny(norm=norm).eval()
    explicit = tiny(norm=norm, attention="explicit").eval()
    explicit.load_state_dict(sdpa.state_dict())
    idx = torch.randint(0, 11, (2, 8))
    torch.testing.assert_close(sdpa(idx)[0], explicit(idx)[0], atol=1e-5, rtol=1e-5)


def test_dropout_is_off_in_eval_and_on_in_training():
    model = tiny(dropout=0.5)
    idx = torch.randint(0, 11, (2, 8))
    model.eval()
    torch.testing.assert_close(model(idx)[0], model(idx)[0])
    model.train()
    assert not torch.allclose(model(idx)[0], model(idx)[0])


def test_post_norm_normalises_after_the_residual_add():
    cfg = GPTConfig(**{**TINY, "norm": "post", "feed_forward": False})
    block = Block(cfg).eval()
    x = torch.randn(2, 8, 16)
    expected = block.ln1(x + block.attn(x))
    torch.testing.assert_close(block(x), expected)


def test_no_residual_drops_the_skip_connection():
    cfg = GPTConfig(**{**TINY, "residual": False, "feed_forward": False})
    block = Block(cfg).eval()
    x = torch.randn(2, 8, 16)
    torch.testing.assert_close(block(x), block.attn(block.ln1(x)))


def test_switched_off_parts_are_absent():
    model = tiny(feed_forward=False, attn_proj=False, norm="none")
    block = model.blocks[0]
    assert block.ffwd is None
    assert isinstance(block.attn.proj, torch.nn.Identity)
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in model.modules())


def test_tied_weights_share_one_matrix():
    model = tiny(tie_weights=True)
    assert model.lm_head.weight is model.tok_emb.weight
    assert model.num_parameters() == tiny().num_parameters() - 11 * 16


def test_a_head_count_that_does_not_divide_the_width_fails_at_construction_naming_both():
    with pytest.raises(UserError, match="--model.n_head 3 does not divide --model.n_embd 10"):
        GPTConfig(**{**TINY, "n_embd": 10, "n_head": 3})


@pytest.mark.parametrize("field,value", [("n_layer", "-1"), ("n_head", "0"), ("dropout", "1.0"), ("norm", "middle")])
def test_the_field_types_refuse_impossible_values_naming_the_field(field, value):
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(GPTConfig, "model")
    with pytest.raises(ArgumentError, match=f"model.{field}"):
        parser.parse_args([f"--model.{field}={value}"])


def test_typed_values_become_built_in_numbers():
    # jsonargparse hands PositiveInt(16), an int subclass; torch.load(weights_only=True) refuses such a checkpoint.
    parser = ArgumentParser()
    parser.add_class_arguments(GPTConfig, "model")
    config = GPTConfig(**parser.parse_args(["--model.n_embd=16", "--model.n_head=2"]).model)
    assert type(config.n_embd) is int and type(config.dropout) is float


def test_loss_falls_on_a_small_text():
    from ..conftest import TINY_TEXT

    vocab = sorted(set(TINY_TEXT))
    data = torch.tensor([vocab.index(c) for c in TINY_TEXT])
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=len(vocab), block_size=16, n_layer=1, n_head=2, n_embd=32, dropout=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        i = torch.randint(0, len(data) - 17, (16,))
        chunk = data[i[:, None] + torch.arange(17)]
        _, loss = model(chunk[:, :-1], chunk[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 3.0  # about ln(vocab size) at initialisation
    assert sum(losses[-10:]) / 10 < 1.5


def test_pre_norm_normalises_the_sublayer_input_and_adds_the_residual():
    block = Block(GPTConfig(**{**TINY, "feed_forward": False})).eval()
    x = torch.randn(2, 8, 16)
    torch.testing.assert_close(block(x), x + block.attn(block.ln1(x)))


def test_feed_forward_sublayer_follows_attention():
    block = Block(GPTConfig(**TINY)).eval()
    x = torch.randn(2, 8, 16)
    h = x + block.attn(block.ln1(x))
    torch.testing.assert_close(block(x), h + block.ffwd(block.ln2(h)))


@pytest.mark.parametrize("n_head", [1, 2, 4])
def test_n_head_splits_attention_into_that_many_weight_maps(n_head):
    model = tiny(n_head=n_head, attention="explicit").eval()
    seen = []
    model.blocks[0].attn.attn_dropout.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    model(torch.randint(0, 11, (3, 8)))
    assert seen == [torch.Size([3, n_head, 8, 8])]


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
def test_attention_maps_are_causal_distributions_whichever_kernel_trains(attention):
    model = tiny(n_layer=2, n_head=2, attention=attention, dropout=0.1).train()
    maps = model.attention_maps(torch.randint(0, 11, (3, 8)))
    assert maps.shape == (2, 3, 2, 8, 8)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 3, 2, 8))  # each query's weights: a distribution
    assert torch.all(maps.triu(diagonal=1) == 0) and torch.all(maps[..., 0, 0] == 1)  # no key after the query
    assert model.training and all(b.attn.attention == attention for b in model.blocks)  # put back as they were


def test_bigram_baseline_reads_only_the_current_token():
    model = tiny(n_layer=0).eval()
    idx = torch.randint(0, 11, (2, 8))
    changed = idx.clone()
    changed[:, :7] = (idx[:, :7] + 1) % 11  # every token but the last
    torch.testing.assert_close(model(idx)[0][:, 7], model(changed)[0][:, 7])


@pytest.mark.parametrize("overrides", [{}, {"feed_forward": False}, {"tie_weights": True}, {"attn_proj": False}])
def test_flops_per_token_matches_a_flop_counter(overrides):
    cfg = GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=4, n_embd=64, attention="explicit", **overrides)
    model = GPT(cfg)
    idx = torch.randint(0, 65, (1, cfg.block_size))
    with FlopCounterMode(display=False) as counter:
        model(idx, idx)[1].backward()
    counted = counter.get_total_flops() / cfg.block_size
    # The formula counts the causal attention as full T x T products, as the explicit path computes them.
    assert counted == model.flops_per_token()


def test_explicit_and_sdpa_attention_agree_under_cpu_bf16_autocast():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=4, n_embd=64, attention="explicit")).eval()
    idx = torch.randint(0, 65, (2, 32))
    reference, _ = model(idx)  # fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explicit, _ = model(idx)
        for block in model.blocks:
            block.attn.attention = "sdpa"
        fused, _ = model(idx)
    assert explicit.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: both paths land within its rounding of the fp32 logits.
    torch.testing.assert_close(explicit.float(), reference, atol=0.05, rtol=0.05)
    torch.testing.assert_close(explicit.float(), fused.float(), atol=0.05, rtol=0.05)
