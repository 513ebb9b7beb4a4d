"""The char-level GPT: model, sampling, generation, training, checkpoints, DDP."""
import csv
import os
import subprocess
import sys

import pytest
import torch

from pyattn.models import generation, sampling, trainer
from pyattn.models.cli import UsageError
from pyattn.models.gpt import GPT, GPTConfig
from pyattn.reference import naive_attention
from pyattn.models.sampling import next_token, top_k_filter, top_p_filter
from pyattn.models.text import DEFAULT_TEXT, CharTokenizer
from conftest import data_path, requires_data

GRIMM = data_path("text", "grimms_fairy_tales.txt")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; on a loaded machine two OpenMP threads
    waiting for each other made these tests 20-50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
requires_grimm = requires_data("text", "grimms_fairy_tales.txt")


def tiny(attn="pyattn", rope=True, n_layer=2, **kw):
    config = GPTConfig(vocab_size=11, block_size=16, n_layer=n_layer, n_head=2, n_embd=32,
                       dropout=0.0, rope=rope, attn=attn, **kw)
    return GPT(config).double()


@pytest.mark.parametrize("rope", [True, False])
def test_causality(rope):
    model = tiny(rope=rope).eval()
    idx = torch.randint(0, 11, (2, 16))
    logits, _ = model(idx)
    changed = idx.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % 11
    logits2, _ = model(changed)
    torch.testing.assert_close(logits[:, :9], logits2[:, :9])
    assert not torch.allclose(logits[:, 9:], logits2[:, 9:])


def test_attention_paths_agree_and_naive_rows_sum_to_one():
    torch.manual_seed(0)
    model = tiny("pyattn").eval()
    idx = torch.randint(0, 11, (3, 13))
    outputs = []
    for attn in ("pyattn", "sdpa", "naive"):
        for block in model.blocks:
            block.attn.attn = attn
        outputs.append(model(idx)[0])
    torch.testing.assert_close(outputs[0], outputs[1])
    torch.testing.assert_close(outputs[0], outputs[2])
    q, k = torch.randn(2, 2, 5, 8, dtype=torch.float64), torch.randn(2, 2, 7, 8, dtype=torch.float64)
    probs = naive_attention(q, k, torch.eye(7, dtype=torch.float64).expand(2, 2, 7, 7), causal=True)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 5, dtype=torch.float64))


def test_shapes_loss_and_gradients_reach_every_parameter():
    model = tiny(rope=False)
    idx = torch.randint(0, 11, (4, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (4, 16, 11) and loss.shape == ()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_weight_decay_only_on_matmul_weights():
    model = tiny()
    decay, rest = model.optimizer_groups(0.1)
    assert all(p.dim() == 2 for p in decay["params"])
    assert model.tok_emb.weight in [p for p in rest["params"]]
    assert len(decay["params"]) + len(rest["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("rope", [True, False])
@pytest.mark.parametrize("attn", ["pyattn", "sdpa", "naive"])
def test_kv_cache_greedy_equals_no_cache(attn, rope):
    torch.manual_seed(1)
    model = tiny(attn, rope).eval()
    prompt = torch.randint(0, 11, (2, 5))
    with_cache = model.generate(prompt, 11, greedy=True, use_cache=True)
    without = model.generate(prompt, 11, greedy=True, use_cache=False)
    assert torch.equal(with_cache, without)
    # past block_size: absolute positions re-encode the window, so both still agree
    if not rope:
        assert torch.equal(model.generate(prompt, 30, greedy=True),
                           model.generate(prompt, 30, greedy=True, use_cache=False))


def _step_logits(model, prompt, new_tokens, use_cache, monkeypatch, **sampling_args):
    """(tokens, logits the sampler saw at each step) of generation (greedy by default)."""
    seen = []
    real = sampling.next_token

    def recording(logits, *args, **kwargs):
        seen.append(logits.clone())
        return real(logits, *args, **kwargs)

    monkeypatch.setattr(sampling, "next_token", recording)
    sampling_args = sampling_args or {"greedy": True}
    out = model.generate(prompt, new_tokens, use_cache=use_cache, **sampling_args)
    monkeypatch.setattr(sampling, "next_token", real)
    return out, torch.stack(seen)


def _sliding_cache_logits(model, prompt, new_tokens):
    """The former generation past block_size: drop the oldest cached key / value and
    keep the others, whose deeper-layer values still depend on the dropped tokens."""
    block = model.config.block_size
    caches = [{} for _ in model.blocks]
    logits, _ = model(prompt[:, -block:], caches=caches)
    seen = []
    for _ in range(new_tokens):
        seen.append(logits[:, -1])
        token = logits[:, -1].argmax(-1, keepdim=True)
        for cache in caches:
            cache["k"], cache["v"] = cache["k"][:, :, 1 - block:], cache["v"][:, :, 1 - block:]
        logits, _ = model(token, caches=caches)
    return torch.stack(seen)


def _scrambled(model):
    """Weights large enough that attention is far from uniform (values differ visibly)."""
    torch.manual_seed(3)
    for p in model.parameters():
        p.data.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("rope", [True, False])
@pytest.mark.parametrize("attn", ["pyattn", "sdpa", "naive"])
def test_kv_cache_logits_equal_no_cache_past_block_size(attn, rope, monkeypatch):
    """Values, not shapes: every step's logits with the cache equal the re-encoded
    window's, before and well past block_size (16) tokens."""
    model = _scrambled(tiny(attn, rope)).eval()
    for prompt_length in (5, 20):  # a prompt shorter and one longer than the window
        prompt = torch.randint(0, 11, (2, prompt_length))
        runs = [_step_logits(model, prompt, 40 - prompt_length, use_cache, monkeypatch,
                             generator=torch.Generator().manual_seed(0))
                for use_cache in (True, False)]
        (cached, cached_logits), (plain, plain_logits) = runs
        assert torch.equal(cached, plain)
        torch.testing.assert_close(cached_logits, plain_logits, rtol=1e-12, atol=1e-12)
        assert len(set(cached[0, 16:].tolist())) > 1  # not a constant: the windows differ


def test_sliding_rope_cache_differs_from_the_window_in_deep_layers(monkeypatch):
    """Why generation re-encodes past block_size: sliding the RoPE cache is exact with
    one layer (its keys depend on the token and, through RoPE, on relative positions
    only), but not with two, and the test above would catch it."""
    prompt = torch.randint(0, 11, (2, 5))
    for n_layer, exact in ((1, True), (2, False)):
        model = _scrambled(tiny(n_layer=n_layer)).eval()
        _, plain = _step_logits(model, prompt, 30, False, monkeypatch)
        sliding = _sliding_cache_logits(model, prompt, 30)
        torch.testing.assert_close(sliding[:11], plain[:11], rtol=1e-12, atol=1e-12)
        past_block = (sliding[11:] - plain[11:]).abs().max().item()
        assert (past_block < 1e-12) == exact, (n_layer, past_block)


def test_top_k_and_top_p_keep_exactly_the_right_tokens():
    logits = torch.log(torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]]))
    kept = torch.isfinite(top_k_filter(logits, 2))
    assert kept.tolist() == [[False, True, False, True, False]]
    # sorted: 0.4, 0.3, 0.15, 0.1, 0.05; cumulative 0.4, 0.7, 0.85: p=0.7 keeps two,
    # p=0.71 needs the third
    assert torch.isfinite(top_p_filter(logits, 0.7)).tolist() == [[False, True, False, True, False]]
    assert torch.isfinite(top_p_filter(logits, 0.71)).tolist() == [[False, True, False, True, True]]
    assert torch.isfinite(top_p_filter(logits, 0.3)).tolist() == [[False, True, False, False, False]]


def test_sampled_histogram_matches_renormalised_distribution():
    logits = torch.log(torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])).expand(20000, 5)
    gen = torch.Generator().manual_seed(0)
    draws = next_token(logits, top_p=0.8, generator=gen).flatten()
    freq = torch.bincount(draws, minlength=5).double() / len(draws)
    expected = torch.tensor([0.0, 0.4, 0.0, 0.3, 0.15], dtype=torch.float64) / 0.85
    torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)
    draws = next_token(logits, top_k=2, generator=gen).flatten()
    freq = torch.bincount(draws, minlength=5).double() / len(draws)
    torch.testing.assert_close(freq, torch.tensor([0, 4 / 7, 0, 3 / 7, 0], dtype=torch.float64),
                               atol=0.015, rtol=0)


def test_low_temperature_approaches_greedy():
    logits = torch.randn(500, 30)
    sampled = next_token(logits, temperature=1e-4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, next_token(logits, greedy=True))
    with pytest.raises(ValueError, match="not both"):
        next_token(logits, top_k=3, top_p=0.5)
    with pytest.raises(ValueError, match="temperature"):
        next_token(logits, temperature=0.0)


def test_tokenizer_rejects_unknown_characters_by_name():
    tok = CharTokenizer.from_text("hello world")
    assert tok.decode(tok.encode("hold")) == "hold"
    with pytest.raises(ValueError, match="'z'"):
        tok.encode("fizz")


def _train_args(text, out_dir, *extra):
    return ["--text", text, "--model-type", "gpt-nano", "--out-dir", str(out_dir),
            "--block-size", "32", "--batch-size", "8", "--max-steps", "8",
            "--eval-interval", "4", "--checkpoint-interval", "4", "--eval-iters", "2",
            "--sample-interval", "0",
            "--warmup-steps", "2", "--device", "cpu", "--no-progress", *extra]


def _losses(out_dir):
    with open(os.path.join(out_dir, "log.csv")) as f:
        return {int(r["step"]): r["train_loss"] for r in csv.DictReader(f)}


@pytest.fixture
def small_text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 200, encoding="utf-8")
    return str(path)


def test_checkpoint_round_trip_and_exact_resume(tmp_path, small_text):
    full = tmp_path / "full"
    trainer.main(_train_args(small_text, full))
    part = tmp_path / "part"
    trainer.train(trainer.build_parser().parse_args(_train_args(small_text, part)), stop_after=5)
    trainer.main(_train_args(small_text, part, "--resume"))  # continues from the step-4 ckpt
    assert _losses(full) == _losses(part)
    assert os.path.exists(full / "loss.png")
    ckpt = trainer.load_checkpoint(str(full / "ckpt.pt"))
    model, tok = trainer.model_from_checkpoint(ckpt)
    assert ckpt["step"] == 8 and tok.vocab_size == len(set(open(small_text).read()))
    texts = generation.main(["--checkpoint", str(full / "ckpt.pt"), "--prompt", "the ",
                             "--num-samples", "2", "--max-new-tokens", "10", "--top-k", "3"])
    assert len(texts) == 2 and all(t.startswith("the ") and len(t) == 14 for t in texts)


def test_bad_checkpoint_and_unknown_prompt_are_clear_errors(tmp_path, small_text):
    bad = tmp_path / "bad.pt"
    torch.save({"weights": torch.zeros(2)}, bad)
    with pytest.raises(trainer.CheckpointError, match="not a pyattn GPT checkpoint"):
        trainer.load_checkpoint(str(bad))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(trainer.CheckpointError, match="not a readable"):
        trainer.load_checkpoint(str(tmp_path / "junk.pt"))
    with pytest.raises(FileNotFoundError):
        trainer.load_checkpoint(str(tmp_path / "missing.pt"))
    out = tmp_path / "run"
    trainer.main(_train_args(small_text, out, "--max-steps", "4"))
    with pytest.raises(UsageError, match="'Z'"):
        generation.main(["--checkpoint", str(out / "ckpt.pt"), "--prompt", "Zebra"])
    with pytest.raises(FileNotFoundError, match="text file not found"):
        trainer.main(_train_args(str(tmp_path / "none.txt"), out))
    ckpt = trainer.load_checkpoint(str(out / "ckpt.pt"))
    ckpt["model"]["head.weight"] = ckpt["model"]["head.weight"][:3]
    with pytest.raises(trainer.CheckpointError, match="does not load"):
        trainer.model_from_checkpoint(ckpt)


def test_checkpoint_interval_is_separate_from_evaluation(tmp_path, small_text):
    out = tmp_path / "run"
    trainer.train(trainer.build_parser().parse_args(_train_args(
        small_text, out, "--eval-interval", "2", "--checkpoint-interval", "3")), stop_after=5)
    assert trainer.load_checkpoint(str(out / "ckpt.pt"))["step"] == 3
    with open(out / "log.csv") as f:
        evaluated = [int(r["step"]) for r in csv.DictReader(f) if r["val_loss"]]
    assert evaluated == [2, 4]


def test_empty_and_degenerate_inputs():
    model = tiny().eval()
    with pytest.raises(ValueError, match="seq >= 1"):
        model.generate(torch.zeros(2, 0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(torch.zeros(2, 1, dtype=torch.long), -1)
    prompt = torch.randint(0, 11, (2, 3))
    assert torch.equal(model.generate(prompt, 0), prompt)
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(UsageError, match="prompt is empty"):
        tok.encode_prompt("")
    with pytest.raises(UsageError, match="'x', 'y'"):
        tok.encode_prompt("xy")  # only unknown characters
    # seq 0 through the model: empty logits, as torch's attention gives
    empty = torch.zeros(2, 0, dtype=torch.long)
    for attn in ("sdpa", "naive"):
        logits, _ = tiny(attn).eval()(empty)
        assert logits.shape == (2, 0, 11)
    try:  # pyattn's kernel: the same empty result, or an error naming the length
        logits, _ = tiny("pyattn").eval()(empty)
        assert logits.shape == (2, 0, 11)
    except ValueError as error:
        assert "sequence length" in str(error)


def test_train_text_defaults_to_the_shipped_grimm():
    args = trainer.build_parser().parse_args([])
    assert args.text == DEFAULT_TEXT == GRIMM
    assert trainer.build_parser().parse_args(["--text", "x.txt"]).text == "x.txt"


def test_ddp_two_gloo_processes_match_one_process(tmp_path, small_text):
    single = tmp_path / "single"
    args = _train_args(small_text, single, "--dropout", "0", "--max-steps", "4")
    trainer.main(args)
    ddp = tmp_path / "ddp"
    script = os.path.join(os.path.dirname(__file__), "..", "examples", "gpt", "train.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--master_port", "29517", script,
                    *_train_args(small_text, ddp, "--dropout", "0", "--max-steps", "4")],
                   check=True, env=env, capture_output=True, timeout=300)
    a = trainer.load_checkpoint(str(single / "ckpt.pt"))["model"]
    b = trainer.load_checkpoint(str(ddp / "ckpt.pt"))["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


@requires_grimm
def test_grimm_text_loads_without_gutenberg_boilerplate():
    from pyattn.models.text import load_text
    text = load_text(GRIMM)
    raw = load_text(GRIMM, strip_boilerplate=False)
    assert raw.startswith("The Project Gutenberg") and "FULL LICENSE" in raw
    assert "Gutenberg" not in text[:2000] and "FULL LICENSE" not in text
    assert len(text) > 0.9 * len(raw)
    tok = CharTokenizer.from_text(text)
    assert not text.startswith("\ufeff") and tok.decode(tok.encode(text[:500])) == text[:500]


def test_strip_gutenberg_keeps_plain_text():
    from pyattn.models.text import strip_gutenberg
    assert strip_gutenberg("just text\n") == "just text\n"
    book = "header\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\nbody\n*** END OF THE X ***\nlicence"
    assert strip_gutenberg(book) == "body\n"
