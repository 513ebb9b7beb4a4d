"""Graphs, the seed's matrix facts (Q3.1), graph layers (Q3.2), data sets, the example."""
import os

import pytest
import torch

from pyattn import graph as G
from pyattn.datasets import karate_club, load_planetoid, safe_unpickle
from pyattn.nn import GCNConv, GraphConv, MessagePassing
from conftest import data_path, requires_data

PLANETOID = data_path("planetoid")
requires_planetoid = requires_data("planetoid", "ind.cora.graph")

# The seed's Q3.1 graphs, from its adjacency matrices (nodes 1..n there, 0..n-1 here).
LEFT = torch.tensor([[0, 1, 1, 0, 1], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [0, 0, 1, 0, 0],
                     [1, 0, 0, 0, 0]])
RIGHT = torch.tensor([[0, 1, 0, 0, 0, 0], [1, 0, 1, 0, 1, 0], [0, 1, 0, 1, 0, 0],
                      [0, 0, 1, 0, 1, 1], [0, 1, 0, 1, 0, 1], [0, 0, 0, 1, 1, 0]])


def test_seed_a_squared_and_laplacian():
    a2 = G.path_counts(LEFT, 2)
    assert a2.tolist() == [[3, 1, 1, 1, 0], [1, 2, 1, 1, 1], [1, 1, 3, 0, 1], [1, 1, 0, 1, 0],
                           [0, 1, 1, 0, 1]]
    assert G.laplacian(RIGHT).tolist() == [
        [1, -1, 0, 0, 0, 0], [-1, 3, -1, 0, -1, 0], [0, -1, 2, -1, 0, 0],
        [0, 0, -1, 3, -1, -1], [0, -1, 0, -1, 3, -1], [0, 0, 0, -1, -1, 2]]
    assert torch.diag(G.degree_matrix(RIGHT)).tolist() == [1, 3, 2, 3, 3, 2]


def test_path_counts_count_walks():
    # walks of length 3 from node 0 back to 0 in the left graph, by enumeration
    n = len(LEFT)
    walks = sum(1 for a in range(n) for b in range(n)
                if LEFT[0, a] and LEFT[a, b] and LEFT[b, 0])
    assert G.path_counts(LEFT, 3)[0, 0].item() == walks


def test_which_nodes_change_most_under_laplacian():
    # F = L X: row v is deg(v) x_v - sum of neighbours. With random features the
    # largest change is not always at the highest degree; the expected squared
    # change E|F_v|^2 = deg(v)^2 + deg(v) for i.i.d. unit features is.
    lap = G.laplacian(RIGHT).double()
    expected = (lap ** 2).sum(1)  # = deg^2 + deg
    deg = RIGHT.sum(1).double()
    torch.testing.assert_close(expected, deg ** 2 + deg)
    most = torch.nonzero(expected == expected.max()).flatten().tolist()
    assert most == [1, 3, 4]  # the seed's nodes 2, 4, 5 (degree 3), not "2, 3 and 5"
    assert torch.argmin(expected).item() == 0  # the seed's node 1 changes least
    x = torch.randn(6, 20000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    empirical = ((lap @ x) ** 2).mean(1)
    torch.testing.assert_close(empirical, expected, rtol=0.05, atol=0)


def test_normalized_laplacian_and_dense_round_trip():
    g = G.Graph.from_adjacency(RIGHT)
    assert torch.equal(g.dense(), RIGHT)
    lsym = G.normalized_laplacian(RIGHT)
    torch.testing.assert_close(torch.diag(lsym), torch.ones(6, dtype=torch.float64))
    eig = torch.linalg.eigvalsh(lsym)
    assert eig.min() > -1e-12 and eig.max() < 2 + 1e-12


def test_graph_construction_options():
    edge_index = torch.tensor([[0, 1, 2], [1, 2, 0]])
    g = G.Graph(edge_index, undirected=True, self_loops=True)
    assert g.num_edges == 6 + 3 and g.in_degree().tolist() == [3, 3, 3]
    torch.testing.assert_close(g.aggregate(torch.eye(3), "sum"), torch.ones(3, 3))
    assert g.to("cpu").num_edges == g.num_edges
    with pytest.raises(ValueError, match=r"\[0, num_nodes"):
        G.Graph(torch.tensor([[0], [5]]), num_nodes=3)
    with pytest.raises(ValueError, match=r"\(2, E\)"):
        G.Graph(torch.tensor([0, 1]))


def test_graphconv_is_eq6_and_message_passing():
    torch.manual_seed(0)
    g = G.Graph.from_adjacency(RIGHT)
    x = torch.randn(6, 5, dtype=torch.float64)
    for out in (3, 8):  # out < in: transform first; out > in: aggregate first
        conv = GraphConv(5, out, activation=torch.relu).double()
        w, b = conv.neighbour.weight, conv.self_weight.weight
        a = RIGHT.double()
        eq6 = torch.relu((a / a.sum(1, keepdim=True)) @ x @ w.T + x @ b.T)
        torch.testing.assert_close(conv(x, g), eq6)
        mpnn = MessagePassing(message=lambda h_v, h_u, e_uv, deg_v: h_u / deg_v,
                              update=lambda h, m: torch.relu(m @ w.T + h @ b.T))
        torch.testing.assert_close(mpnn(x, g), eq6)


def test_gcnconv_matches_dense_formula():
    torch.manual_seed(0)
    g = G.Graph.from_adjacency(LEFT)
    g_loops = G.Graph(g.edge_index, 5, self_loops=True)
    conv = GCNConv(4, 3).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    a = LEFT.double() + torch.eye(5, dtype=torch.float64)
    d = a.sum(1).rsqrt()
    expected = d[:, None] * a * d[None, :] @ x @ conv.linear.weight.T + conv.bias
    torch.testing.assert_close(conv(x, g_loops), expected)


def test_karate_club_is_built_in():
    data = karate_club()
    assert data.num_nodes == 34 and data.edge_index.shape == (2, 156) and data.num_classes == 2
    assert (data.train_mask.sum(), data.val_mask.sum(), data.test_mask.sum()) == (8, 8, 18)


@requires_planetoid
def test_planetoid_cora_and_citeseer():
    cora = load_planetoid(PLANETOID, "cora")
    assert cora.x.shape == (2708, 1433) and cora.edge_index.shape[1] == 10556
    assert (cora.train_mask.sum(), cora.val_mask.sum(), cora.test_mask.sum()) == (140, 500, 1000)
    assert cora.num_classes == 7
    citeseer = load_planetoid(PLANETOID, "citeseer")
    assert citeseer.x.shape == (3327, 3703) and citeseer.num_classes == 6
    assert citeseer.test_mask.sum() == 1000 and (citeseer.x.sum(1) == 0).sum() >= 15


def test_planetoid_loader_refuses_other_classes_and_missing_files(tmp_path):
    import pickle
    evil = pickle.dumps(os.system, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle"):
        safe_unpickle(evil)
    with pytest.raises(FileNotFoundError, match="ind.cora.x"):
        load_planetoid(str(tmp_path), "cora")
    with pytest.raises(ValueError, match="unknown Planetoid"):
        load_planetoid(str(tmp_path), "pubmed2")


def test_gcn_example_runs_on_karate_club(capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "gcn_example", os.path.join(os.path.dirname(__file__), "..", "examples", "gcn.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    accuracies = module.main(["--dataset", "karate", "--seeds", "2", "--epochs", "50"])
    assert len(accuracies) == 2
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("test accuracy: ")
