"""Faults around the GPT command lines: user errors are one stderr line and a non-zero
exit (no traceback); SIGKILL at random moments, inside a checkpoint write included,
never leaves an unreadable checkpoint and resumes to the uninterrupted run's losses
and weights, bit for bit; a distributed run whose peer stops answering ends with a
clear error within its --dist-timeout instead of hanging."""
import csv
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO
from pyattn.models import generation, trainer

TRAIN = os.path.join(REPO, "examples", "gpt", "train.py")
GENERATE = os.path.join(REPO, "examples", "gpt", "generate.py")
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_args(text, out, *extra, steps=6):
    return ["--text", str(text), "--model-type", "gpt-nano", "--out-dir", str(out),
            "--block-size", "32", "--batch-size", "8", "--max-steps", str(steps),
            "--eval-interval", "5", "--checkpoint-interval", "3", "--eval-iters", "2",
            "--sample-interval", "0", "--warmup-steps", "2", "--dropout", "0.1",
            "--device", "cpu", "--no-progress", *extra]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A text and a trained checkpoint to misuse."""
    root = tmp_path_factory.mktemp("gpt_cli")
    text = root / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200, encoding="utf-8")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    trainer.main(train_args(text, root / "run", steps=3))
    torch.set_num_threads(threads)
    return root, text, root / "run" / "ckpt.pt"


def fails_in_one_line(cli, argv, capsys, expected: str):
    """``cli(argv)`` exits non-zero with exactly one stderr line containing ``expected``."""
    try:
        status = cli(argv)
    except SystemExit as exit_:  # argparse
        status = exit_.code
    err = capsys.readouterr().err
    assert status not in (0, None), err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert expected in lines[0], lines[0]


def broken_checkpoints(root, good):
    """name -> path of: missing, empty, truncated, garbage, and a foreign torch file."""
    data = good.read_bytes()
    files = {"missing": root / "missing.pt", "empty": root / "empty.pt",
             "truncated": root / "truncated.pt", "garbage": root / "garbage.pt",
             "foreign": root / "foreign.pt"}
    files["empty"].write_bytes(b"")
    files["truncated"].write_bytes(data[:len(data) // 2])
    files["garbage"].write_bytes(bytes(range(256)) * 8)
    torch.save({"weights": torch.zeros(3)}, files["foreign"])
    return files


CHECKPOINT_MESSAGES = {"missing": "checkpoint not found", "empty": "is empty",
                       "truncated": "not a readable", "garbage": "not a readable",
                       "foreign": "not a pyattn GPT checkpoint"}


@pytest.mark.parametrize("kind", sorted(CHECKPOINT_MESSAGES))
def test_broken_checkpoint_is_one_line_in_both_clis(kind, run, tmp_path, capsys):
    root, text, good = run
    path = broken_checkpoints(tmp_path, good)[kind]
    fails_in_one_line(generation.cli_main, ["--checkpoint", str(path)], capsys,
                      CHECKPOINT_MESSAGES[kind])
    out = tmp_path / "resume"
    out.mkdir()
    if kind != "missing":
        os.replace(path, out / "ckpt.pt")
    fails_in_one_line(trainer.cli_main, train_args(text, out, "--resume"), capsys,
                      "no checkpoint" if kind == "missing" else CHECKPOINT_MESSAGES[kind])


@pytest.mark.parametrize("argv, expected", [
    (["--prompt", ""], "prompt is empty"),
    (["--prompt", "QXZ"], "outside the vocabulary"),        # only unknown characters
    (["--prompt", "the Zebra"], "'Z'"),
    (["--top-p", "0"], "--top-p"), (["--top-p", "1.5"], "in (0, 1]"),
    (["--temperature", "0"], "--temperature"), (["--temperature", "-1"], "> 0"),
    (["--top-k", "0"], "--top-k"), (["--top-k", "3", "--top-p", "0.5"], "not allowed with"),
    (["--num-samples", "0"], "--num-samples"), (["--max-new-tokens", "-1"], "--max-new-tokens"),
    (["--device", "nonsense"], "not a device"), (["--attn", "fast"], "--attn"),
    (["--unknown"], "unrecognized arguments"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "no CUDA GPU")]))
def test_generate_user_errors_are_one_line(argv, expected, run, capsys):
    _, _, ckpt = run
    fails_in_one_line(generation.cli_main, ["--checkpoint", str(ckpt), "--max-new-tokens", "2",
                                            *argv], capsys, expected)


@pytest.mark.parametrize("argv, expected", [
    (["--max-steps", "-5"], "--max-steps"), (["--max-steps", "0"], ">= 1"),
    (["--max-steps", "ten"], "--max-steps"), (["--lr", "0"], "--lr"),
    (["--dropout", "1"], "[0, 1)"), (["--batch-size", "0"], "--batch-size"),
    (["--block-size", "-1"], "--block-size"), (["--epochs", "-1"], "--epochs"),
    (["--checkpoint-interval", "0"], "--checkpoint-interval"),
    (["--eval-interval", "0"], "--eval-interval"), (["--warmup-steps", "-1"], "--warmup-steps"),
    (["--dist-timeout", "0"], "--dist-timeout"), (["--model-type", "gpt-huge"], "invalid choice"),
    (["--device", "tpu:x"], "not a device"), (["--block-size", "5000"], "too few for --block-size"),
])
def test_train_bad_flags_are_one_line(argv, expected, run, tmp_path, capsys):
    _, text, _ = run
    fails_in_one_line(trainer.cli_main, train_args(text, tmp_path / "out", *argv), capsys,
                      expected)


def test_train_bad_text_is_one_line(tmp_path, capsys):
    cases = {"missing.txt": (None, "text file not found"),
             "empty.txt": (b"", "too short"),
             "latin1.txt": ("Märchen".encode("latin-1") * 100, "not UTF-8"),
             "short.txt": (b"abc" * 20, "too few for --block-size")}
    for name, (content, expected) in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        fails_in_one_line(trainer.cli_main, train_args(tmp_path / name, tmp_path / "out"),
                          capsys, expected)


def test_script_prints_one_line_and_no_traceback(run):
    """The real entry point, as a user runs it (train.py's is the same ``run_cli``
    wiring, exercised in-process above; each interpreter start costs seconds)."""
    _, _, ckpt = run
    argv = [GENERATE, "--checkpoint", str(ckpt), "--prompt", "Zebra"]
    done = subprocess.run([sys.executable, *argv], env=ONE_THREAD, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr and "generate.py: error: prompt 'Zebra'" in done.stderr


# ---------------------------------------------------------------- SIGKILL and resume

def log_rows(out):
    """(step, train loss, val loss, lr) of every logged step, as written."""
    with open(out / "log.csv") as f:
        return [(r["step"], r["train_loss"], r["val_loss"], r["lr"]) for r in csv.DictReader(f)]


def start_training(text, out, steps, pause=0.0):
    """train.py in a child process (resuming if a checkpoint exists), once it has
    built its model and is about to take its first step."""
    resume = ["--resume"] if (out / "ckpt.pt").exists() else []
    env = {**ONE_THREAD, trainer.WRITE_PAUSE_ENV: str(pause)}
    proc = subprocess.Popen([sys.executable, TRAIN, *train_args(text, out, *resume, steps=steps)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    header = proc.stdout.readline()
    if "parameters" not in header:
        proc.kill()
        pytest.fail(f"train.py did not start: {header}{proc.communicate()[1]}")
    return proc


def kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before the kill landed"


def checkpoint_on_disk_loads(out) -> int:
    """The step of OUT/ckpt.pt (0 if none yet), after loading it as generate.py would."""
    path = out / "ckpt.pt"
    if not path.exists():
        return 0
    ckpt = trainer.load_checkpoint(str(path))
    trainer.model_from_checkpoint(ckpt)
    return ckpt["step"]


def kill_during_write(text, out, steps):
    """Kill inside a checkpoint write: the writer pauses after its first bytes."""
    tmp = out / "ckpt.pt.tmp"
    # An earlier kill may have landed between a write's end and its rename, leaving
    # a complete ckpt.pt.tmp; the wait below must see this run's write, not that.
    tmp.unlink(missing_ok=True)
    proc = start_training(text, out, steps, pause=60.0)
    deadline = time.monotonic() + 120
    while not (tmp.exists() and tmp.stat().st_size > 0):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
        time.sleep(0.01)
    kill(proc)
    with pytest.raises(trainer.CheckpointError):  # the kill did tear the new file
        trainer.load_checkpoint(str(tmp))


def last_logged_step(out) -> int:
    try:
        lines = (out / "log.csv").read_text().splitlines()[1:]
    except FileNotFoundError:
        return 0
    complete = [line for line in lines if line.count(",") == 4]
    return int(complete[-1].split(",")[0]) if complete else 0


def kill_during_steps(text, out, steps, rng):
    """Kill at a random moment a few steps into the resumed run (chosen in steps, not
    seconds, so that a loaded machine still kills mid-run, after new checkpoints)."""
    proc = start_training(text, out, steps)
    target = checkpoint_on_disk_loads(out) + rng.randint(2, 8)
    deadline = time.monotonic() + 120
    while last_logged_step(out) < target:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
        time.sleep(0.005)
    time.sleep(rng.uniform(0.0, 0.05))
    kill(proc)


def interrupted_run_equals_uninterrupted(tmp_path, kills, steps, seed):
    text = tmp_path / "text.txt"
    text.write_text("a tale of two foxes, told twice over. " * 300, encoding="utf-8")
    reference = tmp_path / "reference"
    trainer.main(train_args(text, reference, steps=steps))

    out = tmp_path / "killed"
    rng = random.Random(seed)
    steps_seen = []
    for kind in kills:
        if kind == "write":
            kill_during_write(text, out, steps)
        else:
            kill_during_steps(text, out, steps, rng)
        steps_seen.append(checkpoint_on_disk_loads(out))
    # the last resume runs in this process (bitwise the same on one thread; one
    # interpreter start-up less)
    trainer.main(train_args(text, out, *(["--resume"] if steps_seen[-1] else []), steps=steps))
    assert max(steps_seen) > 0  # some kill came after a checkpoint: a real resume

    assert log_rows(out) == log_rows(reference)
    killed = trainer.load_checkpoint(str(out / "ckpt.pt"))
    expected = trainer.load_checkpoint(str(reference / "ckpt.pt"))
    assert killed["step"] == expected["step"] == steps
    for name, tensor in expected["model"].items():
        assert torch.equal(killed["model"][name], tensor), name
    return steps_seen


def test_sigkill_during_steps_and_a_checkpoint_write_resumes_exactly(tmp_path):
    interrupted_run_equals_uninterrupted(tmp_path, ["step", "write", "step"], steps=40, seed=0)


@pytest.mark.slow
def test_sigkill_many_times_resumes_exactly(tmp_path):
    rng = random.Random(1)
    kills = [rng.choice(["step", "step", "write"]) for _ in range(10)]
    interrupted_run_equals_uninterrupted(tmp_path, kills, steps=120, seed=2)


# ---------------------------------------------------------------- distributed faults

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_rank(rank, port, text, out, timeout_s):
    env = {**ONE_THREAD, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank)}
    argv = train_args(text, out, "--dist-timeout", str(timeout_s), steps=100000)
    return subprocess.Popen([sys.executable, TRAIN, *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def ends_with_lost_peer(proc, within_s):
    started = time.monotonic()
    _, err = proc.communicate(timeout=within_s)
    lines = err.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, err
    assert "peer process died or did not answer" in lines[0], lines[0]
    return time.monotonic() - started, lines[0]


def peer_fault_ends_rank0(text, out, timeout_s, fault) -> float:
    """Two ranks train; ``fault`` hits rank 1 mid-training; rank 0 must end with one
    clear line within 90 s. Returns (rank 0's seconds from the fault to its exit, line)."""
    port = free_port()
    ranks = [start_rank(r, port, text, out, timeout_s) for r in (0, 1)]
    try:
        assert "parameters" in ranks[0].stdout.readline()
        time.sleep(0.3)
        fault(ranks[1])
        return ends_with_lost_peer(ranks[0], within_s=90)
    finally:
        for proc in ranks:
            proc.kill()
            proc.communicate()


def test_ddp_rank_whose_peer_hangs_fails_within_the_timeout(run, tmp_path):
    """Rank 1 is frozen (SIGSTOP) mid-training: rank 0 must not wait forever."""
    _, text, _ = run
    line = peer_fault_ends_rank0(text, tmp_path / "ddp", 3,
                                 lambda proc: proc.send_signal(signal.SIGSTOP))[1]
    assert "timed out" in line.lower()  # the --dist-timeout ended it, nothing else


@pytest.mark.slow
def test_ddp_rank_whose_peer_dies_or_never_comes_fails(run, tmp_path):
    _, text, _ = run
    # a dead peer's closed socket is noticed at once, long before the 60 s timeout
    assert peer_fault_ends_rank0(text, tmp_path / "ddp", 60, kill)[0] < 60
    alone = start_rank(0, free_port(), text, tmp_path / "alone", timeout_s=3)
    ends_with_lost_peer(alone, within_s=90)
