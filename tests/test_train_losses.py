"""InfoNCE with hard negatives, several positives and duplicate targets, checked against hand computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmemb.train.losses import info_nce, target_masks

TAU = 0.5


def unit(*v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


Q = np.stack([unit(1, 0.2, 0), unit(0.1, 1, 0.3), unit(0, 0.2, 1)])
T = np.stack([unit(1, 0, 0), unit(0, 1, 0), unit(0.2, 0, 1)])  # positives of the three pairs
N = np.stack([unit(1, 1, 0), unit(0, 1, 1), unit(1, 0, 1)])  # one hard negative per pair


def hand_loss(S, positives, counted):
    """mean_i [ log sum_{j counted} e^{S_ij/tau} - log sum_{j in P_i} e^{S_ij/tau} ], written out."""
    total = 0.0
    for i, pos in enumerate(positives):
        denom = sum(math.exp(S[i, j] / TAU) for j in counted)
        numer = sum(math.exp(S[i, j] / TAU) for j in pos)
        total += math.log(denom) - math.log(numer)
    return total / len(positives)


def run(q, t, q_keys, pos_keys, t_keys):
    positive, counted = target_masks(torch.arange(len(q)), torch.tensor(q_keys), torch.tensor(pos_keys),
                                     torch.tensor(t_keys))
    loss, correct = info_nce(torch.tensor(q, dtype=torch.float64), torch.tensor(t, dtype=torch.float64),
                             positive, counted, TAU)
    return float(loss), positive, counted, correct


def test_plain_3x3_in_batch_negatives():
    S = Q @ T.T
    loss, positive, counted, correct = run(Q, T, [1, 2, 3], [11, 12, 13], [11, 12, 13])
    assert positive.tolist() == np.eye(3, dtype=bool).tolist() and counted.all()
    assert loss == pytest.approx(hand_loss(S, [[0], [1], [2]], [0, 1, 2]), abs=1e-12)
    assert correct.tolist() == [bool(S[i].argmax() == i) for i in range(3)]


def test_hard_negatives_enter_every_denominator():
    targets = np.concatenate([T, N])
    S = Q @ targets.T
    loss, positive, counted, _ = run(Q, targets, [1, 2, 3], [11, 12, 13], [11, 12, 13, 21, 22, 23])
    expected = hand_loss(S, [[0], [1], [2]], range(6))
    assert loss == pytest.approx(expected, abs=1e-12)
    base = hand_loss(Q @ T.T, [[0], [1], [2]], [0, 1, 2])
    # exactly the extra mass of the three negatives in each denominator
    extra = np.mean([math.log(1 + sum(math.exp(S[i, j] / TAU) for j in (3, 4, 5))
                              / sum(math.exp(S[i, j] / TAU) for j in (0, 1, 2))) for i in range(3)])
    assert loss - base == pytest.approx(extra, abs=1e-12) and loss > base


def test_queries_with_equal_content_share_their_positives():
    # queries 0 and 1 are the same input (one image, two captions): t0 and t1 are both positives of both
    S = Q @ T.T
    loss, positive, counted, _ = run(Q, T, [1, 1, 3], [11, 12, 13], [11, 12, 13])
    assert positive.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    assert loss == pytest.approx(hand_loss(S, [[0, 1], [0, 1], [2]], [0, 1, 2]), abs=1e-12)


def test_duplicate_targets_are_not_negatives_of_each_other():
    # pair 2's positive has the same content as pair 0's (the same class label): one column, counted once
    targets = np.stack([T[0], T[1], T[0]])
    S = Q @ targets.T
    loss, positive, counted, _ = run(Q, targets, [1, 2, 3], [11, 12, 11], [11, 12, 11])
    assert counted.tolist() == [True, True, False]
    assert positive.tolist() == [[True, False, True], [False, True, False], [True, False, True]]
    assert loss == pytest.approx(hand_loss(S, [[0], [1], [0]], [0, 1]), abs=1e-12)
    # counted twice, the duplicate would have been a negative of query 2's own positive
    assert loss < hand_loss(S, [[0], [1], [2]], [0, 1, 2])


def test_gradient_matches_autograd_of_hand_formula():
    q = torch.tensor(Q, requires_grad=True)
    t = torch.tensor(np.concatenate([T, N]), requires_grad=True)
    positive, counted = target_masks(torch.arange(3), torch.tensor([1, 1, 3]), torch.tensor([11, 12, 13]),
                                     torch.tensor([11, 12, 13, 21, 22, 23]))
    info_nce(q, t, positive, counted, TAU)[0].backward()
    q2, t2 = q.detach().clone().requires_grad_(), t.detach().clone().requires_grad_()
    S = q2 @ t2.T / TAU
    pos = [[0, 1], [0, 1], [2]]
    ref = sum(torch.logsumexp(S[i], 0) - torch.logsumexp(S[i, pos[i]], 0) for i in range(3)) / 3
    ref.backward()
    torch.testing.assert_close(q.grad, q2.grad, atol=1e-12, rtol=0)
    torch.testing.assert_close(t.grad, t2.grad, atol=1e-12, rtol=0)


def _objective_inputs(q, t):
    """RowMeta / PairMeta for len(q) pairs: query i's positive is target i (direct queries only)."""
    from mmemb.train.losses import DIRECT_QUERY, TARGET, PairMeta, RowMeta

    n = len(q)
    rows = RowMeta(kind=torch.tensor([DIRECT_QUERY] * n + [TARGET] * n), pair=torch.tensor([*range(n), *[-1] * n]),
                   key=torch.tensor([0] * n + [100 + i for i in range(n)]))
    pairs = PairMeta(query_key=torch.arange(n) + 1, positive_key=torch.arange(n) + 100,
                     lm_tokens=torch.zeros(n, dtype=torch.long), has_decision=torch.zeros(n, dtype=torch.long))
    return torch.cat([q, t]), rows, pairs


def test_matryoshka_adds_the_nce_of_each_truncated_size():
    from mmemb.train.config import LossConfig
    from mmemb.train.losses import JointObjective

    g = torch.Generator().manual_seed(0)
    q, t = [torch.nn.functional.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=-1)
            for _ in range(2)]
    emb, rows, pairs = _objective_inputs(q, t)
    plain = JointObjective(LossConfig(temperature=TAU, reason_nce=0, lm=0, decision=0)).contrastive(emb, rows, pairs)
    mat = JointObjective(LossConfig(temperature=TAU, reason_nce=0, lm=0, decision=0, matryoshka_dims=[3, 5]))
    res = mat.contrastive(emb, rows, pairs)
    expected = {}
    for d in (3, 5):
        qd, td = (torch.nn.functional.normalize(x[:, :d], dim=-1).numpy() for x in (q, t))
        expected[d] = hand_loss(qd @ td.T, [[i] for i in range(5)], range(5))
    assert res.terms["nce_direct"] == pytest.approx(plain.terms["nce_direct"], abs=1e-12)
    assert res.terms["nce_direct@3"] == pytest.approx(expected[3], abs=1e-12)
    assert res.terms["nce_direct@5"] == pytest.approx(expected[5], abs=1e-12)
    assert float(res.loss) == pytest.approx(plain.terms["nce_direct"] + expected[3] + expected[5], abs=1e-12)
    with pytest.raises(ValueError, match="not smaller than the embedding size 8"):
        JointObjective(LossConfig(matryoshka_dims=[8])).contrastive(emb, rows, pairs)


def test_matryoshka_training_makes_truncated_vectors_retrieve():
    """Free embeddings trained with and without the Matryoshka term: only the former still match
    their pairs when cut to their first 2 of 64 dimensions (the full size matches either way)."""
    from mmemb.train.config import LossConfig
    from mmemb.train.losses import JointObjective, first_dims

    def train(dims):
        g = torch.Generator().manual_seed(1)
        q = torch.randn(32, 64, generator=g).requires_grad_()
        t = torch.randn(32, 64, generator=g).requires_grad_()
        objective = JointObjective(LossConfig(temperature=0.1, reason_nce=0, lm=0, decision=0, matryoshka_dims=dims))
        opt = torch.optim.Adam([q, t], lr=0.05)
        for _ in range(150):
            emb, rows, pairs = _objective_inputs(*(torch.nn.functional.normalize(x, dim=-1) for x in (q, t)))
            opt.zero_grad()
            objective.contrastive(emb, rows, pairs).loss.backward()
            opt.step()
        return {d: float(((first_dims(q, d) @ first_dims(t, d).T).argmax(1) == torch.arange(32)).float().mean())
                for d in (2, 64)}

    plain, matryoshka = train([]), train([2])
    assert plain[64] == matryoshka[64] == 1.0
    assert matryoshka[2] == 1.0 and plain[2] <= 0.5, (plain, matryoshka)  # measured: 1.0 against 0.31


def test_matryoshka_dims_in_the_training_config():
    from mmemb.train.config import ConfigError, load_config

    cfg = load_config(None, ["model=m", "output_dir=o", "datasets=[d]", "loss.matryoshka_dims=[32,64]"])
    assert cfg.loss.matryoshka_dims == [32, 64]
    with pytest.raises(ConfigError, match="matryoshka_dims must be positive"):
        load_config(None, ["model=m", "output_dir=o", "datasets=[d]", "loss.matryoshka_dims=[0]"])
