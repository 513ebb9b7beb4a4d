"""Seed Q3: node classification with the seed's GraphConv (eq. 6) and Kipf &
Welling's GCN on Cora / CiteSeer (or the built-in karate club)."""
from __future__ import annotations

import copy
import os
import dataclasses
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pyattn.datasets import GraphData, karate_club, load_planetoid
from pyattn.graph import Graph
from pyattn.nn import GCNConv, GraphConv

MODELS = ("graphconv", "gcn")


class TwoLayer(nn.Module):
    """conv -> ReLU -> dropout -> conv, dropout on the input too (Kipf & Welling)."""

    def __init__(self, model: str, in_features: int, hidden: int, classes: int,
                 dropout: float):
        super().__init__()
        layer = {"graphconv": GraphConv, "gcn": GCNConv}[model]
        self.conv1, self.conv2 = layer(in_features, hidden), layer(hidden, classes)
        self.dropout = dropout

    def forward(self, x, graph):
        x = F.dropout(x, self.dropout, self.training)
        x = F.relu(self.conv1(x, graph))
        x = F.dropout(x, self.dropout, self.training)
        return self.conv2(x, graph)


@dataclasses.dataclass
class GCNConfig:
    hidden: int = 64
    dropout: float = 0.5
    lr: float = 0.01
    weight_decay: float = 5e-4
    epochs: int = 200
    patience: int = 20


# The Planetoid files shipped with the repository (data/planetoid; see its README).
SHIPPED_PLANETOID = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "data", "planetoid")


def load_dataset(name: str, data_dir: Optional[str] = None) -> GraphData:
    """``karate`` (built in) or a Planetoid set from ``data_dir`` (default: the
    repository's data/planetoid)."""
    if name == "karate":
        return karate_club()
    data_dir = data_dir or SHIPPED_PLANETOID
    data = load_planetoid(data_dir, name)
    # row-normalised bag-of-words features, as Kipf & Welling
    data.x = data.x / data.x.sum(1, keepdim=True).clamp(min=1)
    return data


def build_graph(data: GraphData, model: str, device) -> Graph:
    """GCN wants A + I; the seed's GraphConv averages the neighbours alone."""
    return Graph(data.edge_index, data.num_nodes, self_loops=model == "gcn").to(device)


def train_once(data: GraphData, graph: Graph, model_name: str, seed: int, config: GCNConfig,
               device) -> float:
    """Test accuracy (percent) of the checkpoint with the best validation loss."""
    torch.manual_seed(seed)
    x, y = data.x.to(device), data.y.to(device)
    masks = [m.to(device) for m in (data.train_mask, data.val_mask, data.test_mask)]
    model = TwoLayer(model_name, x.shape[1], config.hidden, data.num_classes,
                     config.dropout).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr,
                                 weight_decay=config.weight_decay)
    best_loss, best_state, stale = float("inf"), None, 0
    for _ in range(config.epochs):
        model.train()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x, graph)[masks[0]], y[masks[0]]).backward()
        optimizer.step()
        model.eval()
        with torch.no_grad():
            val_loss = F.cross_entropy(model(x, graph)[masks[1]], y[masks[1]]).item()
        if val_loss < best_loss:
            best_loss, best_state, stale = val_loss, copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
            if stale >= config.patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    with torch.no_grad():
        pred = model(x, graph).argmax(1)
    return 100.0 * (pred[masks[2]] == y[masks[2]]).float().mean().item()


def run(dataset: str, model: str, seeds: int, device, data_dir: Optional[str] = None,
        config: Optional[GCNConfig] = None, progress: bool = True) -> list[float]:
    """Test accuracies (percent) over seeds 0..seeds-1."""
    from tqdm.auto import tqdm

    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    config = config or GCNConfig(hidden=16 if model == "gcn" else 64)
    data = load_dataset(dataset, data_dir)
    graph = build_graph(data, model, device)
    return [train_once(data, graph, model, seed, config, device)
            for seed in tqdm(range(seeds), desc=f"{model} on {dataset}", unit="seed",
                             disable=not progress)]


def summary(accuracies: list[float]) -> str:
    return f"test accuracy: {np.mean(accuracies):.2f} ± {np.std(accuracies):.2f}"
