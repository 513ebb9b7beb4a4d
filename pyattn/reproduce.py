"""Reproduce every study of the seed write-up as one report with figures.

    python -m pyattn.reproduce --out reports            # quick setting (<= 10 min, 2 CPU cores)
    python -m pyattn.reproduce --out reports --full     # the seed's settings (hours on a CPU)

Writes OUT/REPORT.md and its PNG figures. Every number in the report comes
from this run; the seed's own figures are quoted beside ours where it gives
them. The GPT trains on the Grimm text and the GCN on Cora shipped in the
repository's data/ folder (``--text`` / ``--planetoid-dir`` point elsewhere);
a section whose data is missing is skipped with the reason.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import time
from typing import Optional

import numpy as np
import torch

from pyattn.datasets import shipped_data

SEED_Q28_PROMPTS = [  # (prompt, temperature, top_p) of the seed's Q2.8
    ("Yesterday, I went to the store and bought some", 1.0, 0.8),
    ("She locked the door before leaving the house because she didnt want anyone to", 0.8, 0.6),
    ("Once upon a time, in a land where the sun never set, there was a magical forest filled with",
     1.0, 0.9),
    ("The king observed the phenomenon with a sense of quixotic wonder, noting that it both "
     "anomalous and", 0.7, 0.9),
    ("The chicken is ready to eat. We set the table and", 0.7, 0.6),
]


@dataclasses.dataclass
class Setting:
    name: str
    padding_repeats: int
    padding_epochs: dict  # net name -> max epochs
    padding_batch: int
    padding_sizes: tuple  # (train, val, test)
    rotation_epochs: int
    gpt_model: str
    gpt_steps: int
    gpt_batch: int
    gpt_samples: int
    attention_seqs: tuple
    gcn_seeds: int
    gcn_epochs: int


SETTINGS = {
    "tiny": Setting("tiny", 1, {"Net1": 1, "Net2": 1}, 50, (200, 100, 100), 1, "gpt-nano", 6, 8,
                    1, (64, 128), 1, 10),
    # Q1.1 quick: batch 50 gives 4x the optimizer steps of the seed's batch 200 per epoch,
    # so Net1's pattern settles within 10 epochs and Net2's within 2.
    # GPT 200 steps of batch 16 and GCN 2 seeds keep the whole report under 10 minutes
    # on 2 idle cores (measured: 300 steps of 32 and 3 seeds took 883 s).
    "quick": Setting("quick", 1, {"Net1": 10, "Net2": 2}, 50, (2000, 1000, 1000), 5,
                     "gpt-micro", 200, 16, 2, (256, 512, 1024, 2048), 2, 200),
    "full": Setting("full", 10, {"Net1": 50, "Net2": 50}, 200, (2000, 1000, 1000), 10,
                    "gpt-mini", 5000, 64, 5, (256, 512, 1024, 2048, 4096), 10, 200),
}


SECTIONS = ("q11", "q12", "q2", "q29", "q3")


class Report:
    """Markdown sections plus the wall and CPU time of each."""

    def __init__(self, out: str):
        self.out, self.parts, self.times, self.cpu_times = out, [], {}, {}
        os.makedirs(out, exist_ok=True)

    def add(self, text: str) -> None:
        self.parts.append(text.rstrip() + "\n")

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)

    def write(self) -> str:
        path = self.path("REPORT.md")
        with open(path, "w") as f:
            f.write("\n".join(self.parts))
        return path


def _section(report: Report, title: str, run, *args):
    print(f"\n== {title}")
    start, cpu_start = time.time(), time.process_time()
    try:
        run(report, *args)
    except SkippedSection as skip:
        report.add(f"## {title}\n\n_Skipped: {skip}_\n")
        print(f"   skipped: {skip}")
    report.times[title] = time.time() - start
    report.cpu_times[title] = time.process_time() - cpu_start
    print(f"   {title}: {report.times[title]:.0f} s wall, {report.cpu_times[title]:.0f} s CPU")


class SkippedSection(Exception):
    pass


def q11_padding(report: Report, s: Setting, device):
    from pyattn.studies import cnn_padding as study

    n_train, n_val, n_test = s.padding_sizes
    # the seed's original protocol draws val and test from the training stream
    data = study.make_datasets("original", n_train, n_val, n_test)
    _plot_padding_samples(data, report.path("q11_samples.png"))
    configs = {net: study.TrainConfig(epochs=s.padding_epochs[net], batch_size=s.padding_batch)
               for net in study.NETS}
    cells = [(net, conv) for net in study.NETS for conv in study.CONV_TYPES]
    rows, _ = study.run_study(cells, s.padding_repeats, configs, device, data=data)
    epochs = ", ".join(f"{net} at most {n}" for net, n in s.padding_epochs.items())
    report.add(f"""## Q1.1 Padding and pooling vs shifted objects

| | this run ({s.name}) | the seed |
| --- | --- | --- |
| repeats per cell | {s.padding_repeats} (weights seeded 0..{s.padding_repeats - 1}) | 10 |
| epochs | {epochs} | at most 50 |
| batch | {s.padding_batch} | 200 |
| early stop | 9th consecutive epoch without a lower val loss | the same |
| optimizer | Adadelta lr 1, rho 0.9, eps 1e-6, weight decay 5e-5 | the same |
| train / val / test images | {n_train} / {n_val} / {n_test} | 2000 / 1000 / 1000 |
| convs | `pyattn.nn.PaddedConv2d` | `torch.nn.Conv2d` |

{data.note().capitalize()}. Val accuracy is the last epoch's, test accuracy that of the
best-val-loss checkpoint on the shifted images; ± is the population std over repeats.

![train and test images](q11_samples.png)

{study.markdown_table(rows)}
""")


def _plot_padding_samples(data, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 6, figsize=(10, 3.6))
    for row, (name, (images, labels)) in enumerate((("train", data.train), ("test", data.test))):
        for col in range(6):
            label = col % 2
            index = (labels == label).nonzero()[col // 2].item()
            axes[row, col].imshow(images[index].permute(1, 2, 0).numpy())
            axes[row, col].set_title(f"{name}, class {label}", fontsize=8)
            axes[row, col].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def q12_rotation(report: Report, s: Setting, device, cifar_dir: Optional[str]):
    from pyattn.studies import rotation

    data = rotation.load_cifar10(cifar_dir) if cifar_dir else rotation.load_digits_32()
    config = rotation.RotationConfig(epochs=s.rotation_epochs)
    results = rotation.run_study(data, config, device)
    rotation.plot(results, config, report.path("q12_rotation.png"),
                  f"{data.name}: accuracy vs test rotation")
    upright, rotated = results["zeros"]["upright"], results["zeros"]["rotated"]
    spread = lambda accs: max(accs) - min(accs)
    flatter = "flatter" if spread(rotated) < spread(upright) else "not flatter"
    upright_cmp = "lower" if rotated[0] < upright[0] else "not lower"
    report.add(f"""## Q1.2 Rotation (in)variance

Settings: {data.name} ({len(data.train[1])} train / {len(data.test[1])} test images),
{s.rotation_epochs} epochs, Adam 1e-3, batch 64; test images rotated about the centre
(bilinear, zero fill). Trained upright: {upright[0]:.1f}% at 0°, {min(upright):.1f}% at
its worst angle, {upright[-1]:.1f}% at 360°. Trained with random rotations the curve is
{flatter} (from {min(rotated):.1f}% to {max(rotated):.1f}%, against {min(upright):.1f}% to
{max(upright):.1f}%) and {upright_cmp} upright ({rotated[0]:.1f}% at 0°).

![rotation](q12_rotation.png)

{rotation.table(results, config)}
""")


def q2_gpt(report: Report, s: Setting, device, text: Optional[str]):
    from pyattn.models import trainer
    from pyattn.models.generation import format_samples, generate_samples

    if not text or not os.path.isfile(text):
        raise SkippedSection(f"no training text (pass --text, e.g. Grimms' Fairy Tales); got {text!r}")
    losses = {}
    for name, extra in (("rope", []), ("abs", ["--abs-emb"])):
        out = report.path(f"gpt_{name}")
        args = trainer.build_parser().parse_args([
            "--text", text, "--model-type", s.gpt_model, "--out-dir", out,
            "--max-steps", str(s.gpt_steps), "--batch-size", str(s.gpt_batch),
            "--eval-interval", str(max(1, s.gpt_steps // 5)), "--sample-interval", "0",
            "--warmup-steps", str(max(1, s.gpt_steps // 10)), "--device", str(device), *extra])
        losses[name] = trainer.train(args)["val_loss"]
    os.replace(report.path("gpt_rope/loss.png"), report.path("q2_gpt_loss.png"))
    model, tokenizer = trainer.model_from_checkpoint(
        trainer.load_checkpoint(report.path("gpt_rope/ckpt.pt")), device)
    blocks = []
    for prompt, temperature, top_p in SEED_Q28_PROMPTS:
        try:
            texts, _ = generate_samples(model, tokenizer, prompt, s.gpt_samples, 100,
                                        temperature, top_p=top_p, seed=0)
        except ValueError as error:  # a prompt character the text lacks
            blocks.append(f"Prompt {prompt!r}: {error}")
            continue
        blocks.append(f"Running with prompt: {prompt!r}, temperature: {temperature}, "
                      f"top_p: {top_p}\n{format_samples(texts)}")
    samples = "\n\n".join(blocks)
    report.add(f"""## Q2 Character-level GPT

Settings: {s.gpt_model}, {s.gpt_steps} steps of {s.gpt_batch} x 128 characters of
`{os.path.basename(text)}` (last 10% held out), AdamW, warmup + cosine, attention through
`pyattn.flash_attention`.

| position embedding | validation loss (nats/char) |
| --- | --- |
| RoPE | {losses['rope']:.4f} |
| learned absolute | {losses['abs']:.4f} |

![training curve](q2_gpt_loss.png)

Samples for the seed's Q2.8 prompts (RoPE model, 100 new characters):

```
{samples}
```
""")


def q29_attention(report: Report, s: Setting, device):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch.nn.functional as F

    import pyattn
    from pyattn.profiling import peak_memory

    from pyattn.reference import naive_attention

    impls = {"naive": naive_attention,
             "torch SDPA": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
             "pyattn": lambda q, k, v: pyattn.flash_attention(q, k, v)}
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results = {name: ([], []) for name in impls}
    for seq in s.attention_seqs:
        q, k, v = (torch.randn(1, 4, seq, 64, device=device, dtype=dtype, requires_grad=True)
                   for _ in range(3))
        grad = torch.randn_like(q)
        for name, fn in impls.items():
            step = lambda: fn(q, k, v).backward(grad)
            step()
            mem = peak_memory(step, device)
            times = []
            for _ in range(3):
                start = time.perf_counter()
                step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append((time.perf_counter() - start) * 1e3)
            results[name][0].append(sorted(times)[1])
            results[name][1].append(mem / 2 ** 20)
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for name, (times, mems) in results.items():
        ax_t.loglog(s.attention_seqs, times, "o-", label=name)
        ax_m.loglog(s.attention_seqs, [max(m, 1e-2) for m in mems], "o-", label=name)
    ax_t.set(xlabel="sequence length", ylabel="forward + backward (ms)", title="time")
    ax_m.set(xlabel="sequence length", ylabel="peak extra memory (MiB)", title="memory")
    for ax in (ax_t, ax_m):
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    fig.savefig(report.path("q29_attention.png"), dpi=120)
    plt.close(fig)
    rows = "\n".join(
        f"| {seq} | " + " | ".join(f"{results[n][0][i]:.1f} ms, {results[n][1][i]:.1f} MiB"
                                   for n in impls) + " |"
        for i, seq in enumerate(s.attention_seqs))
    def exponent(values):  # least-squares slope of log(value) against log(seq)
        kept = [(math.log(q), math.log(v)) for q, v in zip(s.attention_seqs, values) if v > 0.05]
        if len(kept) < 2:
            return "n/a (below the measurement's resolution)"
        xs, ys = zip(*kept)
        return f"{np.polyfit(xs, ys, 1)[0]:.2f}"
    mem_exp = {n: exponent(results[n][1]) for n in impls}
    time_exp = {n: exponent(results[n][0]) for n in impls}
    report.add(f"""## Q2.1 / Q2.9 Attention cost against sequence length

Settings: batch 1, 4 heads, head_dim 64, {dtype}, forward + backward, device {device},
median of 3 runs. Fitted exponents p of peak memory ∝ seq^p: naive {mem_exp['naive']},
torch SDPA {mem_exp['torch SDPA']}, pyattn {mem_exp['pyattn']} (2 = the seq x seq scores
are stored; 1 = only O(seq) statistics). Time ∝ seq^p: naive {time_exp['naive']}, torch SDPA
{time_exp['torch SDPA']}, pyattn {time_exp['pyattn']} (all compute the seq x seq products).

![attention time and memory](q29_attention.png)

| seq | """ + " | ".join(impls) + " |\n|" + " --- |" * (len(impls) + 1) + f"\n{rows}\n")


def q3_graphs(report: Report, s: Setting, device, planetoid_dir: Optional[str]):
    from pyattn import graph as G
    from pyattn.studies import gcn

    left = torch.tensor([[0, 1, 1, 0, 1], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [0, 0, 1, 0, 0],
                         [1, 0, 0, 0, 0]])
    right = torch.tensor([[0, 1, 0, 0, 0, 0], [1, 0, 1, 0, 1, 0], [0, 1, 0, 1, 0, 0],
                          [0, 0, 1, 0, 1, 1], [0, 1, 0, 1, 0, 1], [0, 0, 0, 1, 1, 0]])
    lap = G.laplacian(right)
    deg = right.sum(1)
    expected = (lap.double() ** 2).sum(1)
    most = [i + 1 for i in torch.nonzero(expected == expected.max()).flatten().tolist()]
    least = [i + 1 for i in torch.nonzero(expected == expected.min()).flatten().tolist()]
    dataset = "cora" if planetoid_dir and os.path.isfile(
        os.path.join(planetoid_dir, "ind.cora.x")) else "karate"
    cfg = lambda model: gcn.GCNConfig(hidden=16 if model == "gcn" else 64, epochs=s.gcn_epochs)
    accs = {m: gcn.run(dataset, m, s.gcn_seeds, device, planetoid_dir, cfg(m))
            for m in gcn.MODELS}
    report.add(f"""## Q3 Graphs and graph convolutions

Left graph (nodes 1..5): A = `{left.tolist()}`, A^2 (walks of length 2) =
`{G.path_counts(left, 2).tolist()}`.

Right graph (nodes 1..6): degrees `{deg.tolist()}`, L = D - A =
`{lap.tolist()}`.

Under F = L X, row v of F is deg(v) x_v minus the sum of v's neighbours, so for
independent unit-variance features E|F_v|^2 = deg(v)^2 + deg(v) = `{expected.int().tolist()}`:
the nodes that change most are **{most}** (degree 3) and the least **{least}**. (The seed
names nodes 2, 3 and 5; node 3 has degree 2, and node 4, of degree 3, changes as much as 2
and 5.)

Node classification on {dataset} ({s.gcn_seeds} seed(s), Adam 0.01, weight decay 5e-4,
dropout 0.5, early stopping on validation loss; `pyattn.spmm` aggregation):

| model | test accuracy |
| --- | --- |
| GraphConv (seed eq. 6, hidden 64) | {np.mean(accs['graphconv']):.2f} ± {np.std(accs['graphconv']):.2f} |
| GCN (Kipf & Welling, hidden 16) | {np.mean(accs['gcn']):.2f} ± {np.std(accs['gcn']):.2f} |
""")


def machine_section(report: Report, setting: Setting, total: float):
    import importlib.metadata

    import pyattn
    from pyattn.backends import compiled_backends

    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = "not installed"
    build = compiled_backends()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    times = "\n".join(f"| {name} | {t:.0f} s | {report.cpu_times[name]:.0f} s |"
                      for name, t in report.times.items())
    report.add(f"""## Machine and run

- setting: {setting.name}; total wall time {total:.0f} s, CPU time {sum(report.cpu_times.values()):.0f} s
- {platform.platform()}, Python {platform.python_version()}, {os.cpu_count()} CPUs,
  {torch.get_num_threads()} torch threads, GPU: {gpu}
- pyattn {pyattn.__version__}, torch {torch.__version__}, triton {triton}
- compiled backends: cpu (OpenMP {build['openmp']}), cuda {build['cuda_archs'] or 'no'}

| section | wall time | CPU time (all threads) |
| --- | --- | --- |
{times}
""")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="reports", help="folder for REPORT.md and figures")
    p.add_argument("--full", action="store_true", help="the seed's full settings")
    p.add_argument("--setting", choices=sorted(SETTINGS), help="explicit setting (tests: tiny)")
    p.add_argument("--text", default=shipped_data("text", "grimms_fairy_tales.txt"),
                   help="training text for the GPT (default: the shipped Grimms' Fairy Tales)")
    p.add_argument("--planetoid-dir", default=shipped_data("planetoid"),
                   help="folder of the Planetoid ind.cora.* files (default: the shipped copy)")
    p.add_argument("--cifar-dir", help="CIFAR-10 python batches (default: built-in digits)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS,
                   help="run only these sections (default: all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(argv=None) -> str:
    p = build_parser()
    args = p.parse_args(argv)
    setting = SETTINGS[args.setting or ("full" if args.full else "quick")]
    device = torch.device(args.device)
    report = Report(args.out)
    report.add(f"# pyattn: reproduction of the seed write-up ({setting.name} setting)\n\n"
               "Every number below was computed by `python -m pyattn.reproduce` in this run.\n")
    start = time.time()
    sections = {"q11": ("Q1.1 padding", q11_padding, ()),
                "q12": ("Q1.2 rotation", q12_rotation, (args.cifar_dir,)),
                "q2": ("Q2 GPT", q2_gpt, (args.text,)),
                "q29": ("Q2.9 attention", q29_attention, ()),
                "q3": ("Q3 graphs", q3_graphs, (args.planetoid_dir,))}
    for key in args.sections or SECTIONS:
        title, run, extra = sections[key]
        _section(report, title, run, setting, device, *extra)
    machine_section(report, setting, time.time() - start)
    path = report.write()
    print(f"\nwrote {path}")
    return path


if __name__ == "__main__":
    main()
