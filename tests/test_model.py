import pytest
import torch

from shakespeare_gpt.errors import UserError
from shakespeare_gpt.model import GPT, Block, GPTConfig
from shakespeare_gpt.sampling import generate

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


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"n_embd": 10, "n_head": 3}, "--model.n_head 3 does not divide --model.n_embd 10"),
        ({"n_layer": -1}, "--model.n_layer -1: give a whole number >= 0"),
        ({"dropout": 1.0}, r"--model.dropout 1.0: give a rate in \[0, 1\)"),
        ({"norm": "middle"}, "--model.norm 'middle': give one of pre, post, none"),
    ],
)
def test_impossible_shapes_fail_at_construction_naming_the_field(overrides, message):
    with pytest.raises(UserError, match=message):
        GPTConfig(**{**TINY, **overrides})


def test_loss_falls_on_a_small_text():
    from .conftest import TINY_TEXT

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


def test_greedy_generation_is_deterministic_and_runs_past_block_size():
    model = tiny()
    idx = torch.zeros(2, 3, dtype=torch.long)
    a = generate(model, idx, 20, top_k=1, generator=torch.Generator().manual_seed(1))
    b = generate(model, idx, 20, top_k=1, generator=torch.Generator().manual_seed(2))
    assert a.shape == (2, 23)  # longer than block_size=8: the context slides
    assert torch.equal(a, b)
    assert torch.equal(a[:, :3], idx)


def test_sampling_is_reproducible_with_a_seed_and_restores_training_mode():
    model = tiny().train()
    idx = torch.zeros(1, 1, dtype=torch.long)
    a = generate(model, idx, 30, temperature=1.5, generator=torch.Generator().manual_seed(7))
    b = generate(model, idx, 30, temperature=1.5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert model.training


@pytest.mark.parametrize("n_layer", [2, 0])
@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
@pytest.mark.parametrize("prompt_len", [1, 5, 13])
def test_kv_cache_gives_the_same_tokens_as_no_cache(attention, prompt_len, n_layer):
    model = tiny(attention=attention, n_layer=n_layer)
    idx = torch.randint(0, 11, (2, prompt_len))
    # 40 new tokens with block_size 8: the window moves many times, and the cache is rebuilt each time.
    cached = generate(model, idx, 40, top_k=1, use_cache=True)
    uncached = generate(model, idx, 40, top_k=1, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.fixture
def two_threads():
    """The split matrix-vector path cuts a matrix into one slab per thread: make sure there are two."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 256), (3, 256), (2, 1, 256)])
def test_split_linear_computes_what_nn_linear_does(two_threads, monkeypatch, shape, bias):
    from shakespeare_gpt.sampling import split_linear

    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 1024, bias=bias)
    x = torch.randn(shape)
    calls = []
    for name in ("bmm", "baddbmm"):
        original = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _f=original, **k: calls.append(1) or _f(*a, **k))
    with torch.inference_mode():
        y = split_linear(layer, x)
    assert calls, "one row on a CPU without grad should take the split path"
    torch.testing.assert_close(y, layer(x), atol=1e-5, rtol=1e-5)
    calls.clear()
    y = split_linear(layer, x)  # with grad: the plain product, so training is untouched
    assert not calls and y.requires_grad


def test_generation_splits_only_large_matrices_and_puts_the_model_back(two_threads):
    from shakespeare_gpt.sampling import split_matrix_products

    model = tiny(n_embd=256, n_head=4, n_layer=1)  # matrices big enough for the split path
    with split_matrix_products(model):
        split = [name for name, m in model.named_modules() if "forward" in vars(m)]
    # q/k/v (256 x 768) and the feed-forward's two (256 x 1024); not the projection (256 x 256) or the head.
    assert split == ["blocks.0.attn.qkv", "blocks.0.ffwd.fc", "blocks.0.ffwd.proj"]
    assert not any("forward" in vars(m) for m in model.modules())
    assert list(model.state_dict()) == list(tiny(n_embd=256, n_head=4, n_layer=1).state_dict())


def test_kv_cache_with_split_matrix_products_gives_the_same_tokens(two_threads, monkeypatch):
    model = tiny(n_embd=256, n_head=4, n_layer=1)
    calls = []
    original = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a, **k: calls.append(1) or original(*a, **k))
    idx = torch.randint(0, 11, (1, 3))
    cached = generate(model, idx, 24, top_k=1, use_cache=True)
    assert calls  # the split path ran
    uncached = generate(model, idx, 24, top_k=1, use_cache=False)
    assert torch.equal(cached, uncached)


def test_kv_cache_logits_match_a_full_forward():
    model = tiny().eval()
    idx = torch.randint(0, 11, (2, 8))
    full, _ = model(idx)
    cache = model.new_cache()
    first, _ = model(idx[:, :3], cache=cache)
    steps = [model(idx[:, t : t + 1], cache=cache)[0] for t in range(3, 8)]
    torch.testing.assert_close(torch.cat([first, *steps], dim=1), full, atol=1e-5, rtol=1e-5)


def test_window_slides_a_quarter_block_at_a_time():
    from shakespeare_gpt.sampling import window_start

    assert [window_start(n, 8) for n in (1, 8, 9, 10, 11, 12)] == [0, 0, 2, 2, 4, 4]
    assert all(n - window_start(n, 256) <= 256 for n in range(1, 2000))
    assert all(n - window_start(n, 256) >= 192 for n in range(256, 2000))


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


def test_bigram_baseline_reads_only_the_current_token():
    model = tiny(n_layer=0).eval()
    idx = torch.randint(0, 11, (2, 8))
    changed = idx.clone()
    changed[:, :7] = (idx[:, :7] + 1) % 11  # every token but the last
    torch.testing.assert_close(model(idx)[0][:, 7], model(changed)[0][:, 7])
