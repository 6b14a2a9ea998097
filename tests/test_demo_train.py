"""Demo model training: tokenizer and encoding, the thoughts loop with gradients, the objective, the saved layout."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoTokenizer

from codi_attn.answers import parse_answer
from codi_attn.demo import task
from codi_attn.demo import train as T
from codi_attn.demo.codi import load_model, new_model, save_model
from codi_attn.demo.tokenizer import EOS, Encoded, build_tokenizer, encode
from codi_attn.hooks import FeedThoughts


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small models: one thread is fastest, and much faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def tiny(tok):
    torch.manual_seed(0)
    return new_model(len(tok), d=32, n_layer=2, n_head=2, n_positions=96).eval()


def batch(tok, k: int, n: int = 4) -> Encoded:
    stream = task.train_stream(seed=5, steps=(k,))
    return encode(tok, [next(stream) for _ in range(n)])


def test_tokenizer(tok):
    V = len(tok)
    assert tok.eos_token_id == 0 and tok.bos_token is None
    ids = tok.encode("Sue has 19 pens. How many pens does Sue have?")
    assert len(ids) == 12 and max(ids) < V  # one token per word, number and symbol; no BOS
    answer = tok.encode("The answer is: 7")
    assert len(answer) == 2
    assert parse_answer(tok.decode(answer + [tok.eos_token_id], skip_special_tokens=True)) == 7.0
    assert all(len(tok.encode(str(v))) == 1 for v in range(task.MAX_VALUE + 1))
    assert tok.unk_token_id not in tok.encode(" ".join(r["question"] + " " + r["answer"]
                                                      for r in task.synthetic_records("test")))


def test_encode_fixed_lengths(tok):
    for k in (1, 2, 3, 4):
        b = batch(tok, k)
        assert b.question.shape == (4, 5 * (k + 1) + 7)  # five tokens a sentence, seven for the question
        assert b.cot.shape == (4, 7 * k)  # << a op b = c >>
        assert b.answer.shape == (4, 3) and (b.answer[:, -1] == tok.eos_token_id).all()


def test_thought_loop_matches_one_forward(tok, tiny):
    """think() feeds z_k = prj(h_{k-1}) at positions Q+1..Q+6 after question + BOT at 0..Q:
    the same as one forward over the whole sequence of embeddings (codi-spec section 3)."""
    b = batch(tok, 3, n=2)
    lm, Q = tiny.codi, b.question.shape[1]
    with torch.no_grad():
        cache, fed = tiny.think(b.question)
        assert fed.shape == (2, 6, lm.config.n_embd)
        assert cache.get_seq_length() == Q + 7
        eot = torch.full((2, 1), tiny.eot_id)
        cached = lm(input_ids=eot, cache=cache).logits[:, -1]
        emb = lm.transformer.wte(torch.cat([b.question, torch.full((2, 1), tiny.bot_id)], 1))
        for _ in range(6):
            h = lm.transformer(inputs_embeds=emb).last_hidden_state[:, -1:]
            emb = torch.cat([emb, tiny.prj(h)], 1)
        full = lm(inputs_embeds=torch.cat([emb, lm.transformer.wte(eot)], 1)).logits[:, -1]
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fed, emb[:, Q + 1:], atol=1e-5, rtol=1e-5)  # the returned thoughts are the fed ones


def test_thoughts_carry_gradients(tok, tiny):
    """Training backpropagates through the chain of thoughts: z6 depends differentiably on z1."""
    b = batch(tok, 2, n=2)
    first = {}
    _, fed = tiny.think(b.question, hooks=[("thought.1.z", lambda v, p, batch: first.update(z=v))])
    direction = torch.randn(fed.shape[-1], generator=torch.Generator().manual_seed(0))  # (a plain sum of a
    grad = torch.autograd.grad((fed[:, -1] @ direction).sum(), first["z"])[0]  # LayerNorm output has no gradient)
    assert grad.abs().sum() > 0


def test_fed_thoughts_are_used_as_given(tok, tiny):
    """The runner's FeedThoughts hook on think(): its own thoughts reproduce the plain run exactly; another
    problem's change what follows (so the 'swap' control really swaps)."""
    b = batch(tok, 3, n=3)
    eot = torch.full((3, 1), tiny.eot_id)
    with torch.no_grad():
        cache, own = tiny.think(b.question)
        base = tiny.codi(input_ids=eot, cache=cache).logits[:, -1]
        cache, fed = tiny.think(b.question, hooks=[FeedThoughts(own)])
        assert torch.equal(fed, own)
        torch.testing.assert_close(tiny.codi(input_ids=eot, cache=cache).logits[:, -1], base, atol=0, rtol=0)
        cache, _ = tiny.think(b.question, hooks=[FeedThoughts(own.roll(1, 0))])
        assert not torch.allclose(tiny.codi(input_ids=eot, cache=cache).logits[:, -1], base, atol=1e-4)
        cache, _ = tiny.think(b.question, hooks=[FeedThoughts(own)], rows=[1, 2, 0])  # rows index the given z
        assert not torch.allclose(tiny.codi(input_ids=eot, cache=cache).logits[:, -1], base, atol=1e-4)
    with pytest.raises(ValueError, match="matches no hook point"):
        tiny.think(b.question, hooks=[("thought.1.head_in.0", lambda v, p, b: None)])  # think offers z and hidden


def test_shared_question_pass_is_the_official_loss(tok, tiny):
    """codi_loss runs the question once; its gradients equal those of separate teacher
    and student passes."""
    b = batch(tok, 2)
    params = list(tiny.parameters())
    shared = T.codi_loss(tiny, b)
    g_shared = torch.autograd.grad(shared["loss"], params)
    t_ce, t_h = T.teacher_forward(tiny, b)
    s_ce, s_h = T.student_forward(tiny, b)
    distill = sum(F.smooth_l1_loss(s, t.detach()) / t.detach().std() for s, t in zip(s_h, t_h)) / len(t_h)
    torch.testing.assert_close(shared["distill"], distill)
    g_separate = torch.autograd.grad(t_ce + s_ce + distill, params)
    for a, c in zip(g_shared, g_separate):
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-4)


def test_short_training_reduces_loss(tok):
    r = T.Recipe(d=32, n_layer=2, n_head=2, steps=30, batch_size=16, lr=3e-3, curriculum="1:codi:1/1/0/0/0/0/0")
    _, log = T.train(r, tok, log_every=0)
    losses = log["losses"]
    assert len(losses) == 30
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])
    _, log = T.train(r, tok, baseline=True, log_every=0)
    assert sum(log["losses"][-5:]) < 0.8 * sum(log["losses"][:5])


def test_saved_layout(tok, tiny, tmp_path):
    save_model(tiny, tok, tmp_path)
    V, d = len(tok), 32
    state = load_file(tmp_path / "ckpt" / "model.safetensors")
    assert state["codi.transformer.wte.weight"].shape == (V + 3, d)
    assert torch.equal(state["codi.lm_head.weight"], state["codi.transformer.wte.weight"])
    assert {k for k in state if k.startswith("prj.")} == {
        f"prj.{i}.{p}" for i in ("1", "3", "ln") for p in ("weight", "bias")}
    assert all(k.startswith(("codi.transformer.", "codi.lm_head.", "prj.")) for k in state)
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    assert config["vocab_size"] == V and config["model_type"] == "gpt2"
    base_tok = AutoTokenizer.from_pretrained(tmp_path / "base")
    assert base_tok.eos_token == EOS and len(base_tok) == V
    base_tok.add_special_tokens({"pad_token": "[PAD]"})
    assert base_tok.pad_token_id == V  # pad/bot/eot = V, V+1, V+2 as the loader makes them
    model, _ = load_model(tmp_path)  # strict
    b = batch(tok, 2)
    with torch.no_grad():
        torch.testing.assert_close(model.codi(input_ids=b.question).logits, tiny.codi(input_ids=b.question).logits)


def test_curriculum_needs_one_weight_per_number_of_operations():
    with pytest.raises(ValueError, match=r"needs 7 weights, one per number of operations 1..7"):
        T.Recipe(curriculum="1:codi:1/1/0/0").phases()
