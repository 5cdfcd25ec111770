"""CRL triplet terms against hand-computed values and a naive per-token reference of docs/METHOD.md."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.testing import assert_close

from crl_ray.training.losses import (
    DISTANCES,
    circuit_breaker_coefficients,
    circuit_breaker_terms,
    distance,
    harmful_centroid,
    kl_retain,
    kl_retain_chunked,
    masked_norm_mean,
    repbend_cluster,
    triplet_terms,
)


def naive_distance(name: str, x: list[float], y: list[float]) -> float:
    l2 = math.sqrt(sum((a - b) ** 2 for a, b in zip(x, y)))
    nx, ny = math.sqrt(sum(a * a for a in x)), math.sqrt(sum(b * b for b in y))
    cos = sum(a * b for a, b in zip(x, y)) / max(nx * ny, 1e-8)
    if name == "l2":
        return l2
    if name == "cosine":
        return 1 - cos
    if name == "l2_normalized_sq":
        return 0.3 * sum((a / nx - b / ny) ** 2 for a, b in zip(x, y))
    return l2 + 10 * (1 - max(cos, 0.0))


def naive_terms(bl, bo, bm, hl, ho, hm, layers_b, layers_h, m_b, m_h, dbp, dbn, dhp, dhn):
    """A literal, loop-by-loop reading of docs/METHOD.md's formulas, in float64 Python."""
    def centroid(layer):
        num, den = None, 0.0
        for i in range(hl[layer].shape[0]):
            for t in range(hl[layer].shape[1]):
                if hm[i][t]:
                    v = hl[layer][i, t].double().tolist()
                    num = v if num is None else [a + b for a, b in zip(num, v)]
                    den += 1
        return [a / den for a in num]

    total_b = 0.0
    for layer in layers_b:
        c = centroid(layer)
        for i in range(bl[layer].shape[0]):
            for t in range(bl[layer].shape[1]):
                if bm[i][t]:
                    h, h0 = bl[layer][i, t].tolist(), bo[layer][i, t].tolist()
                    total_b += max(naive_distance(dbp, h, h0) - naive_distance(dbn, h, c) + m_b, 0.0)
    total_h = 0.0
    for layer in layers_h:
        c = centroid(layer)
        for i in range(hl[layer].shape[0]):
            for t in range(hl[layer].shape[1]):
                if hm[i][t]:
                    h, h0 = hl[layer][i, t].tolist(), ho[layer][i, t].tolist()
                    total_h += max(naive_distance(dhp, h, c) - naive_distance(dhn, h, h0) + m_h, 0.0)
    nb = sum(sum(r) for r in bm)
    nh = sum(sum(r) for r in hm)
    return total_b / (len(layers_b) * nb), total_h / (len(layers_h) * nh)


def test_hand_computed_l2_case() -> None:
    """One layer, D=2. Harmful centroid = [3, 4] (only the first harmful token is masked in).

    Benign, m_b=5, l2/l2: token 1: d_pos 0, d_neg sqrt(20) -> 5 - sqrt(20); token 2: d_pos 1, d_neg sqrt(18)
    -> 6 - sqrt(18); L_b = (11 - sqrt(20) - sqrt(18)) / 2 = 1.142664...
    Harmful, m_h=4, l2/l2: d_pos 0 (the token is the centroid), d_neg |[3,4]-[0,4]| = 3 -> L_h = 1.
    """
    bl = [torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])]
    bo = [torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])]
    hl = [torch.tensor([[[3.0, 4.0], [0.0, 0.0]]])]
    ho = [torch.tensor([[[0.0, 4.0], [9.0, 9.0]]])]
    lb, lh = triplet_terms(bl, bo, torch.tensor([[1, 1]]), hl, ho, torch.tensor([[1, 0]]),
                           benign_layers=[0], harmful_layers=[0], margin_benign=5.0, margin_harmful=4.0,
                           dist_benign_pos="l2", dist_benign_neg="l2", dist_harmful_pos="l2", dist_harmful_neg="l2")
    assert_close(lb, torch.tensor((11 - math.sqrt(20) - math.sqrt(18)) / 2))
    assert_close(lh, torch.tensor(1.0))


def test_each_distance_by_hand() -> None:
    x, y = torch.tensor([3.0, 4.0]), torch.tensor([4.0, -3.0])  # orthogonal, |x|=|y|=5, |x-y| = sqrt(50)
    assert_close(distance("l2", x, y), torch.tensor(math.sqrt(50)))
    assert_close(distance("cosine", x, y), torch.tensor(1.0))
    assert_close(distance("l2_normalized_sq", x, y), torch.tensor(0.3 * 2.0))
    assert_close(distance("mix", x, y), torch.tensor(math.sqrt(50) + 10.0))
    assert_close(distance("mix", x, -x), torch.tensor(10.0 + 10.0))  # ReLU(cos=-1) = 0
    with pytest.raises(ValueError):
        distance("manhattan", x, y)


def _random_case(seed: int, layers: int = 5, b: int = 2, t: int = 6, d: int = 8):
    g = torch.Generator().manual_seed(seed)
    make = lambda: [torch.randn(b, t, d, generator=g) for _ in range(layers)]  # noqa: E731
    bm = (torch.rand(b, t, generator=g) > 0.4).long()
    hm = (torch.rand(b, t, generator=g) > 0.4).long()
    bm[0, 0] = hm[0, 0] = 1
    return make(), make(), bm, make(), make(), hm


PAIRS = list(itertools.product(DISTANCES, repeat=2))
# 16 cases; the benign slots run through all 16 (pos, neg) pairs, the harmful slots too (in reverse order)
COMBOS = [(a, b, c, d) for (a, b), (c, d) in zip(PAIRS, reversed(PAIRS))]


@pytest.mark.parametrize("dbp,dbn,dhp,dhn", COMBOS)
@pytest.mark.parametrize("seed,layers_b,layers_h,m_b,m_h", [(0, [0, 1, 2, 3, 4], [3, 4], 2.0, 3.0),
                                                            (1, [2], [1, 2, 4], 0.5, 20.0),
                                                            (2, [4, 1], [0], 0.0, 0.0)])
def test_matches_naive_reference(dbp, dbn, dhp, dhn, seed, layers_b, layers_h, m_b, m_h) -> None:
    bl, bo, bm, hl, ho, hm = _random_case(seed)
    lb, lh = triplet_terms(bl, bo, bm, hl, ho, hm, benign_layers=layers_b, harmful_layers=layers_h,
                           margin_benign=m_b, margin_harmful=m_h, dist_benign_pos=dbp, dist_benign_neg=dbn,
                           dist_harmful_pos=dhp, dist_harmful_neg=dhn)
    rb, rh = naive_terms(bl, bo, bm.tolist(), hl, ho, hm.tolist(), layers_b, layers_h, m_b, m_h, dbp, dbn, dhp, dhn)
    assert_close(lb.double(), torch.tensor(rb, dtype=torch.float64), rtol=1e-4, atol=1e-5)
    assert_close(lh.double(), torch.tensor(rh, dtype=torch.float64), rtol=1e-4, atol=1e-5)


def test_all_sixteen_slot_combinations_covered() -> None:
    assert {(a, b) for a, b, _, _ in COMBOS} == set(PAIRS) == {(c, d) for _, _, c, d in COMBOS}
    assert len(PAIRS) == 16


def test_gradients_finite_when_lora_equals_original() -> None:
    """At step 0 the adapter is a no-op (LoRA B = 0): h == h0, where ||x - y|| has a kink. Grads must stay finite."""
    bl, _, bm, hl, _, hm = _random_case(3)
    bl = [x.requires_grad_() for x in bl]
    hl = [x.requires_grad_() for x in hl]
    for name in DISTANCES:
        lb, lh = triplet_terms(bl, [x.detach() for x in bl], bm, hl, [x.detach() for x in hl], hm,
                               benign_layers=[0, 1], harmful_layers=[2, 3], margin_benign=100.0, margin_harmful=100.0,
                               dist_benign_pos=name, dist_benign_neg=name, dist_harmful_pos=name,
                               dist_harmful_neg=name)
        grads = torch.autograd.grad(lb + lh, bl[:2] + hl[2:4])
        assert all(torch.isfinite(g).all() for g in grads), name


def test_masked_positions_do_not_matter() -> None:
    bl, bo, bm, hl, ho, hm = _random_case(4)
    kw = dict(benign_layers=[1, 2], harmful_layers=[3], margin_benign=1.0, margin_harmful=1.0,
              dist_benign_pos="mix", dist_benign_neg="mix", dist_harmful_pos="mix", dist_harmful_neg="mix")
    base = triplet_terms(bl, bo, bm, hl, ho, hm, **kw)
    bl2 = [x.clone() for x in bl]
    hl2 = [x.clone() for x in hl]
    for x in bl2:
        x[bm == 0] = 1e3
    for x in hl2:
        x[hm == 0] = -1e3
    moved = triplet_terms(bl2, bo, bm, hl2, ho, hm, **kw)
    assert_close(moved[0], base[0]) and assert_close(moved[1], base[1])


def test_centroid_and_diagnostics() -> None:
    h = torch.tensor([[[1.0, 1.0], [3.0, 5.0]], [[5.0, 3.0], [100.0, 100.0]]])
    m = torch.tensor([[1, 1], [1, 0]])
    assert_close(harmful_centroid(h, m), torch.tensor([3.0, 3.0]))
    bl, bo, bm, hl, ho, hm = _random_case(5)
    *_, diag = triplet_terms(bl, bo, bm, hl, ho, hm, benign_layers=[0], harmful_layers=[1], margin_benign=1.0,
                             margin_harmful=1.0, dist_benign_pos="l2", dist_benign_neg="l2", dist_harmful_pos="l2",
                             dist_harmful_neg="l2", return_diagnostics=True)
    dists = {"dist/benign_pos", "dist/benign_neg", "dist/harmful_pos", "dist/harmful_neg"}
    assert set(diag) == dists | {"train/active_benign", "train/active_harmful"}
    assert all(diag[k] > 0 for k in dists)
    assert all(0.0 <= diag[k] <= 1.0 for k in ("train/active_benign", "train/active_harmful"))


def _hand_case():
    """The tensors of test_hand_computed_l2_case (one layer, D=2, centroid [3, 4]); see its docstring."""
    bl = [torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])]
    bo = [torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])]
    hl = [torch.tensor([[[3.0, 4.0], [0.0, 0.0]]])]
    ho = [torch.tensor([[[0.0, 4.0], [9.0, 9.0]]])]
    return bl, bo, torch.tensor([[1, 1]]), hl, ho, torch.tensor([[1, 0]])


@pytest.mark.parametrize("m_b, m_h, active_b, active_h", [
    (100.0, 100.0, 1.0, 1.0),  # every hinge active
    (0.0, 0.0, 0.0, 0.0),      # none: benign args -sqrt(20), 1 - sqrt(18); harmful arg 0 - 3
    (4.0, 3.0, 0.5, 0.0),      # benign args 4 - 4.47 < 0, 5 - 4.24 > 0; harmful arg exactly 0 is not active
])
def test_active_hinge_fractions_by_hand(m_b, m_h, active_b, active_h) -> None:
    """Active = masked position with d_pos - d_neg + m > 0. Benign (l2/l2): token 1 d_pos 0, d_neg sqrt(20) = 4.47;
    token 2 d_pos 1, d_neg sqrt(18) = 4.24. Harmful: one masked token, d_pos 0, d_neg 3 (the masked-out row is
    ignored however far it lies)."""
    *_, diag = triplet_terms(*_hand_case(), benign_layers=[0], harmful_layers=[0], margin_benign=m_b,
                             margin_harmful=m_h, dist_benign_pos="l2", dist_benign_neg="l2", dist_harmful_pos="l2",
                             dist_harmful_neg="l2", return_diagnostics=True)
    assert diag["train/active_benign"] == active_b
    assert diag["train/active_harmful"] == active_h


def test_active_hinge_fractions_count_layers_and_split_into_rank_shares() -> None:
    """Over layers x masked tokens; with the global counts of two halves, the halves' fractions add to the whole's."""
    bl, bo, bm, hl, ho, hm = _random_case(6)
    kw = dict(benign_layers=[0, 2, 4], harmful_layers=[1, 3], margin_benign=0.3, margin_harmful=0.2,
              dist_benign_pos="cosine", dist_benign_neg="cosine", dist_harmful_pos="cosine",
              dist_harmful_neg="cosine", return_diagnostics=True)
    *_, whole = triplet_terms(bl, bo, bm, hl, ho, hm, **kw)
    cents = {l: harmful_centroid(hl[l], hm) for l in range(5)}
    def naive_fraction(lora, pos, neg, mask, layers, margin):
        """Literal count over (layer, row, token) of masked positions with d_pos - d_neg + m > 0 (float64)."""
        active = 0
        for l in layers:
            for i in range(mask.shape[0]):
                for t in range(mask.shape[1]):
                    h = lora[l][i, t].tolist()
                    arg = (naive_distance("cosine", h, pos(l, i, t)) - naive_distance("cosine", h, neg(l, i, t))
                           + margin)
                    active += int(mask[i, t]) * (arg > 0)
        return active / (len(layers) * int(mask.sum()))

    centroid = lambda l, i, t: cents[l].tolist()  # noqa: E731
    expected = {
        "train/active_benign": naive_fraction(bl, lambda l, i, t: bo[l][i, t].tolist(), centroid, bm, [0, 2, 4], 0.3),
        "train/active_harmful": naive_fraction(hl, centroid, lambda l, i, t: ho[l][i, t].tolist(), hm, [1, 3], 0.2),
    }
    for key, value in expected.items():
        assert math.isclose(whole[key], value, rel_tol=1e-6), key
        assert 0.0 < value < 1.0, key  # a mixed case, so the comparison is not vacuous
    halves = [triplet_terms([x[s] for x in bl], [x[s] for x in bo], bm[s], [x[s] for x in hl], [x[s] for x in ho],
                            hm[s], centroids=cents, benign_count=bm.sum(), harmful_count=hm.sum(), **kw)[2]
              for s in (slice(0, 1), slice(1, 2))]
    for key in ("train/active_benign", "train/active_harmful"):
        assert math.isclose(halves[0][key] + halves[1][key], whole[key], rel_tol=1e-6), key


def test_kl_retain_zero_for_equal_logits_and_matches_formula() -> None:
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(2, 3, 5, generator=g)
    z = torch.randn(2, 3, 5, generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert_close(kl_retain(z0, z0, mask), torch.tensor(0.0))
    t = 2.0
    p = torch.softmax(z0 / t, -1)
    ref = sum(float((p[i, j] * (p[i, j].log() - torch.log_softmax(z[i, j] / t, -1))).sum())
              for i in range(2) for j in range(3) if mask[i, j]) * t * t / 2
    assert_close(kl_retain(z0, z, mask), torch.tensor(ref, dtype=torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kl_retain_chunked_is_kl_retain(monkeypatch, dtype) -> None:
    """Chunks of 3 positions over 2 x 5 (a short last chunk), a masked position: the same value bit for bit, and
    the closed-form gradient equal to autograd's through kl_retain within float32 rounding (within one bfloat16
    rounding step for bfloat16 logits), unscaled and scaled."""
    import crl_ray.training.losses as losses

    monkeypatch.setattr(losses, "KL_CHUNK_ROWS", 3)
    g = torch.Generator().manual_seed(1)
    z0 = (torch.randn(2, 5, 11, generator=g) * 3).to(dtype)
    z = (torch.randn(2, 5, 11, generator=g) * 3).to(dtype)
    mask = torch.ones(2, 5)
    mask[1, 4] = 0
    for scale in (1.0, 0.7):
        a, b = z.clone().requires_grad_(), z.clone().requires_grad_()
        plain = kl_retain(z0, a, mask, 2.0, num_sequences=torch.tensor(3.0))
        chunked = kl_retain_chunked(z0, b, mask, 2.0, num_sequences=torch.tensor(3.0))
        assert plain.dtype == chunked.dtype == torch.float32 and torch.equal(plain, chunked)
        (scale * plain).backward()
        (scale * chunked).backward()
        assert b.grad.dtype == dtype and b.grad.shape == z.shape
        assert_close(b.grad.float(), a.grad.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-7)
        assert float(b.grad[1, 4].abs().sum()) == 0.0 and float(b.grad.abs().sum()) > 0
    assert_close(kl_retain_chunked(z0, z0, mask), torch.tensor(0.0))
    assert_close(kl_retain_chunked(z0, z, mask), kl_retain(z0, z, mask))  # default: the local batch size


def test_kl_retain_chunked_gradient_is_exactly_zero_where_the_logits_agree() -> None:
    """A zero-initialised adapter gives the frozen logits at the first step: the KL's gradient there is zero. The
    closed form gives exactly zero; autograd through log-softmax leaves a rounding residue at almost every logit
    (which Adam's per-element normalisation can turn into step-sized updates)."""
    z0 = torch.randn(1, 8, 4096, generator=torch.Generator().manual_seed(3)) * 4
    plain, chunked = z0.clone().requires_grad_(), z0.clone().requires_grad_()
    kl_retain(z0, plain, torch.ones(1, 8)).backward()
    kl_retain_chunked(z0, chunked, torch.ones(1, 8)).backward()
    assert torch.count_nonzero(chunked.grad) == 0
    assert float(plain.grad.abs().max()) < 1e-6  # autograd: zero within rounding only


# --------------------------------------------------------------------------------------------- data parallel
def test_triplet_terms_global_centroid_and_counts_split_like_one_batch():
    """Two halves with the global centroid and global mask sums add up to the loss of the whole batch."""
    g = torch.Generator().manual_seed(3)
    hl = [torch.randn(4, 5, 6, generator=g) for _ in range(3)]
    ho = [torch.randn(4, 5, 6, generator=g) for _ in range(3)]
    bl = [torch.randn(4, 5, 6, generator=g) for _ in range(3)]
    bo = [torch.randn(4, 5, 6, generator=g) for _ in range(3)]
    bm = (torch.rand(4, 5, generator=g) > 0.3).float()
    hm = (torch.rand(4, 5, generator=g) > 0.3).float()
    kw = dict(benign_layers=[0, 1, 2], harmful_layers=[1, 2], margin_benign=2.0, margin_harmful=3.0,
              dist_benign_pos="l2", dist_benign_neg="cosine", dist_harmful_pos="mix", dist_harmful_neg="cosine")
    whole = triplet_terms(bl, bo, bm, hl, ho, hm, **kw)
    cents = {l: harmful_centroid(hl[l], hm) for l in range(3)}
    parts = [triplet_terms([x[s] for x in bl], [x[s] for x in bo], bm[s], [x[s] for x in hl], [x[s] for x in ho],
                           hm[s], centroids=cents, benign_count=bm.sum(), harmful_count=hm.sum(), **kw)
             for s in (slice(0, 2), slice(2, 4))]
    assert_close(parts[0][0] + parts[1][0], whole[0])
    assert_close(parts[0][1] + parts[1][1], whole[1])


def test_kl_retain_num_sequences_overrides_batch_size():
    g = torch.Generator().manual_seed(0)
    z0, z = torch.randn(2, 3, 7, generator=g), torch.randn(2, 3, 7, generator=g)
    mask = torch.ones(2, 3)
    assert_close(kl_retain(z0, z, mask, 2.0, num_sequences=4.0), kl_retain(z0, z, mask, 2.0) / 2)


# --------------------------------------------------------------------------------------------- baselines
def test_circuit_breaker_schedule():
    """c_r = a*t/(2T), c_cb = a*(1 - t/(2T)): t=0 -> (0, a); t=T -> (a/2, a/2); here a=10, T=150."""
    assert circuit_breaker_coefficients(0, 150, 10.0) == (0.0, 10.0)
    assert circuit_breaker_coefficients(150, 150, 10.0) == (5.0, 5.0)
    c_r, c_cb = circuit_breaker_coefficients(30, 150, 10.0)
    assert math.isclose(c_r, 1.0) and math.isclose(c_cb, 9.0)


def test_circuit_breaker_terms_hand_computed():
    """One layer, one row, D=2.
    retain: h=(3,4), h0=(0,0) -> ||.||=5 at t0; h=(1,0), h0=(1,0) -> 0 at t1; mean over 2 tokens = 2.5.
    cb: h=(1,0) vs h0=(1,1): cos=1/sqrt2 -> relu 0.7071; h=(-1,0) vs h0=(1,0): cos=-1 -> 0; masked both: 0.7071/2.
    """
    retain_l = [torch.tensor([[[3.0, 4.0], [1.0, 0.0]]])]
    retain_o = [torch.tensor([[[0.0, 0.0], [1.0, 0.0]]])]
    harm_l = [torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])]
    harm_o = [torch.tensor([[[1.0, 1.0], [1.0, 0.0]]])]
    mask = torch.ones(1, 2)
    loss_retain, loss_cb = circuit_breaker_terms(retain_l, retain_o, mask, harm_l, harm_o, mask,
                                                 retain_layers=[0], cb_layers=[0])
    assert_close(loss_retain, torch.tensor(2.5))
    assert_close(loss_cb, torch.tensor(1 / math.sqrt(2) / 2))


def test_circuit_breaker_cb_term_averages_over_layers_and_tokens_as_the_reference():
    """The reference divides sum ReLU(cos) by its mask repeated per layer: |cb_layers| x masked tokens.

    Two layers, one row of three tokens, the last masked out. Layer 0: h=(1,0) vs h0=(1,0): cos 1; h=(0,1) vs
    h0=(1,1): cos 1/sqrt2. Layer 1: h=(1,0) vs h0=(0,1): cos 0; h=(-1,0) vs h0=(1,0): cos -1 -> ReLU 0.
    Sum = 1 + 1/sqrt2; 2 layers x 2 tokens -> L_cb = (1 + 1/sqrt2) / 4 = 0.4268.
    """
    lora = [torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]]), torch.tensor([[[1.0, 0.0], [-1.0, 0.0], [5.0, 5.0]]])]
    orig = [torch.tensor([[[1.0, 0.0], [1.0, 1.0], [5.0, 5.0]]]), torch.tensor([[[0.0, 1.0], [1.0, 0.0], [5.0, 5.0]]])]
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    _, loss_cb = circuit_breaker_terms(lora, orig, mask, lora, orig, mask, retain_layers=[0], cb_layers=[0, 1])
    assert_close(loss_cb, torch.tensor((1 + 1 / math.sqrt(2)) / 4))
    h = [torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[0.0, 1.0]]])]
    _, one = circuit_breaker_terms(h, h, torch.ones(1, 1), h, h, torch.ones(1, 1), retain_layers=[0], cb_layers=[0])
    _, two = circuit_breaker_terms(h, h, torch.ones(1, 1), h, h, torch.ones(1, 1), retain_layers=[0],
                                   cb_layers=[0, 1])
    assert_close(one, torch.tensor(1.0))  # cos(h, h) = 1
    assert_close(two, torch.tensor(1.0))  # averaged, not summed, over layers


def test_repbend_cluster_hand_computed():
    """Rows r0=(1,0), r1=(0,1), r2=(1,0) at the last request token: pair cosines 0,1,0 (each twice) ->
    mean off-diagonal cos = 2/6 -> 1 - 1/3 = 2/3. One row -> 0."""
    h = torch.zeros(3, 2, 2)
    h[0, 1] = torch.tensor([1.0, 0.0])
    h[1, 1] = torch.tensor([0.0, 5.0])
    h[2, 1] = torch.tensor([2.0, 0.0])
    last = torch.tensor([[0.0, 1.0]] * 3)
    assert_close(repbend_cluster([h], last, [0]), torch.tensor(2 / 3))
    assert_close(repbend_cluster([h[:1]], last[:1], [0]), torch.tensor(0.0))


def test_masked_norm_mean_uses_mask_and_layers():
    lora = [torch.tensor([[[3.0, 4.0], [6.0, 8.0]]]), torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])]
    orig = [torch.zeros(1, 2, 2), torch.zeros(1, 2, 2)]
    mask = torch.tensor([[1.0, 0.0]])
    assert_close(masked_norm_mean(lora, orig, mask, [0]), torch.tensor(5.0))
    assert_close(masked_norm_mean(lora, orig, mask, [0, 1]), torch.tensor(3.0))  # (5 + 1) / 2
