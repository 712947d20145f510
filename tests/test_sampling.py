"""The C++ sampler on hand-made logits: each filter, their order, seeding and validation."""

import numpy as np
import pytest

from mambart import _C


def softmax(x):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


LOGITS = np.array([1.0, 3.0, -2.0, 2.5, 0.0, 3.0, -1.0, 0.5], dtype=np.float32)


def probs(**kw):
    return _C.sampling_probs(LOGITS.copy(), **kw).astype(np.float64)


def test_greedy_is_argmax_lowest_id_on_ties():
    p = probs(temperature=0.0)
    assert p.tolist() == [0, 1, 0, 0, 0, 0, 0, 0]  # ids 1 and 5 tie at 3.0: the lower id wins
    assert _C.sample_token(LOGITS.copy(), temperature=0.0, seed=123) == 1


@pytest.mark.parametrize("V", [1, 15, 16, 17, 50280, 50283])
def test_greedy_over_a_vocabulary_is_the_first_maximum(V):
    # The greedy pass runs 16 lanes at a time with a scalar tail: ties across lanes and in the
    # tail, a maximum in the tail, signed zeros, and a repetition penalty.
    rng = np.random.default_rng(V)
    rows = [rng.standard_normal(V).astype(np.float32)]
    r = np.round(rng.standard_normal(V), 1).astype(np.float32)  # many ties
    rows.append(r)
    t = rng.standard_normal(V).astype(np.float32)
    t[-1] = 10.0  # the maximum in the scalar tail
    rows.append(t)
    z = -np.ones(V, dtype=np.float32)
    z[V // 2:] = 0.0
    z[V // 2::2] = -0.0
    rows.append(z)
    for row in rows:
        assert _C.sample_token(row.copy(), temperature=0.0, seed=1) == int(np.argmax(row))
    x = rng.standard_normal(V).astype(np.float32)
    seen = np.argsort(-x)[: max(1, V // 10)]
    pen = x.copy()
    pen[seen] = np.where(pen[seen] < 0, pen[seen] * 3.0, pen[seen] / 3.0)
    be = _C._ops.Backend("cpu")
    mask = np.zeros((1, V), dtype=np.uint8)
    mask[0, seen] = 1
    ids, _ = be.sample(x[None].copy(), 0.0, 0, 1.0, 0.0, 3.0, 1, 0, mask)
    assert int(ids[0]) == int(np.argmax(pen))


def test_temperature_is_softmax_of_scaled_logits():
    for t in (0.5, 1.0, 2.0):
        np.testing.assert_allclose(probs(temperature=t), softmax(LOGITS / t), rtol=1e-5, atol=1e-7)


def test_top_k_keeps_k_largest_and_renormalises():
    p = probs(temperature=1.0, top_k=3)
    keep = [1, 5, 3]  # 3.0, 3.0, 2.5
    ref = np.zeros(8)
    ref[keep] = softmax(LOGITS[keep])
    np.testing.assert_allclose(p, ref, rtol=1e-5, atol=1e-7)
    # k larger than the vocabulary is no filter
    np.testing.assert_allclose(probs(temperature=1.0, top_k=100), softmax(LOGITS), rtol=1e-5)


def test_top_p_keeps_smallest_prefix_reaching_p():
    full = softmax(LOGITS)
    order = sorted(range(8), key=lambda i: (-full[i], i))
    for top_p in (0.1, 0.5, 0.8, 0.95):
        cum, keep = 0.0, []
        for i in order:
            keep.append(i)
            cum += full[i]
            if cum >= top_p:
                break
        ref = np.zeros(8)
        ref[keep] = full[keep] / full[keep].sum()
        np.testing.assert_allclose(probs(temperature=1.0, top_p=top_p), ref, rtol=1e-5, atol=1e-7)
    # the most likely token always survives
    assert probs(temperature=1.0, top_p=1e-6)[1] == 1.0


def test_min_p_is_relative_to_the_top_probability():
    full = softmax(LOGITS)
    for min_p in (0.05, 0.3, 0.7):
        keep = full >= min_p * full.max()
        ref = np.where(keep, full, 0.0)
        ref /= ref.sum()
        np.testing.assert_allclose(probs(temperature=1.0, min_p=min_p), ref, rtol=1e-5, atol=1e-7)


def test_repetition_penalty_divides_positive_multiplies_negative():
    seen = [1, 2, 2]  # a repeated id is penalised once
    mod = LOGITS.astype(np.float64).copy()
    mod[1] /= 1.5
    mod[2] *= 1.5
    np.testing.assert_allclose(probs(temperature=1.0, repetition_penalty=1.5, previous_tokens=seen),
                               softmax(mod), rtol=1e-5, atol=1e-7)
    # greedy applies the penalty too: id 1 (3.0 -> 2.0) loses to id 5 (3.0)
    p = probs(temperature=0.0, repetition_penalty=1.5, previous_tokens=[1])
    assert int(np.argmax(p)) == 5


def test_filters_compose_in_documented_order():
    # penalty -> temperature -> top-k -> top-p -> min-p
    seen, t, k, top_p, min_p = [5], 0.7, 5, 0.9, 0.2
    mod = LOGITS.astype(np.float64).copy()
    mod[5] /= 1.3
    mod /= t
    order = sorted(range(8), key=lambda i: (-mod[i], i))[:k]
    p = softmax(mod[order])
    cum, n = 0.0, 0
    for q in p:
        cum += q
        n += 1
        if cum >= top_p:
            break
    ids, p = order[:n], p[:n]
    keep = p >= min_p * p.max()
    ref = np.zeros(8)
    ref[np.array(ids)[keep]] = p[keep] / p[keep].sum()
    got = probs(temperature=t, top_k=k, top_p=top_p, min_p=min_p, repetition_penalty=1.3,
                previous_tokens=seen)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)


def test_seeded_draws_reproduce_and_follow_the_distribution():
    a = [_C.sample_token(LOGITS.copy(), temperature=1.0, seed=7, counter=c) for c in range(3000)]
    b = [_C.sample_token(LOGITS.copy(), temperature=1.0, seed=7, counter=c) for c in range(3000)]
    c = [_C.sample_token(LOGITS.copy(), temperature=1.0, seed=8, counter=c) for c in range(3000)]
    assert a == b
    assert a != c
    freq = np.bincount(a, minlength=8) / len(a)
    np.testing.assert_allclose(freq, softmax(LOGITS), atol=0.03)
    # filtered tokens are never drawn
    d = [_C.sample_token(LOGITS.copy(), temperature=1.0, top_k=2, seed=1, counter=c)
         for c in range(500)]
    assert set(d) == {1, 5}


@pytest.mark.parametrize("kw, name", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(min_p=-0.1), "min_p"),
    (dict(min_p=1.1), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
])
def test_bad_sampling_options_raise_naming_the_parameter(kw, name):
    with pytest.raises(ValueError, match=name):
        _C.sampling_probs(LOGITS.copy(), **kw)
