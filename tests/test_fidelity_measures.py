"""pepemb/fidelity.py against hand computations: CKA, Spearman, neighbourhood overlap, masked marginals
on a tiny student, agreement of mutation scores, the frequency baseline and mean pooling."""

import math

import numpy as np
import pytest
import torch

from architecture import STANDARD_RESIDUES, ResidueTokenizer, Student, StudentConfig, mean_pooled
from pepemb import fidelity

torch.set_num_threads(1)

PROTBERT_VOCAB = "[PAD] [UNK] [CLS] [SEP] [MASK] L A G V E S I K R D T P N Q F Y M H C W X U B Z O".split()
ESM2_VOCAB = ("<cls> <pad> <eos> <unk> L A G V S E R T I D P K Q N F Y M H W C X B U Z O . - <null_1> <mask>").split()
SEQUENCES = ["MKTAYIAKQRQISFVKSHFSRQ", "GSHMAC", "ACDEFGHIKLMNPQRSTVWYX", "WWKLLP"]


def tiny_student(tokenizer):
    torch.manual_seed(0)
    config = StudentConfig.from_tokenizer(tokenizer, d_model=32, num_heads=2, num_layers=2)
    return Student(config).eval()


@pytest.fixture(scope="module", params=[PROTBERT_VOCAB, ESM2_VOCAB], ids=["protbert", "esm"])
def tokenizer_and_model(request):
    tokenizer = ResidueTokenizer.from_vocab(request.param)
    return tokenizer, tiny_student(tokenizer)


# -- Spearman ------------------------------------------------------------------------------------


def test_spearman_known_rankings():
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert fidelity.spearman(x, x**3) == pytest.approx(1.0)
    assert fidelity.spearman(x, -np.exp(x)) == pytest.approx(-1.0)
    assert fidelity.spearman(x, np.ones(5)) is None
    assert fidelity.spearman([1.0], [2.0]) is None


def test_spearman_with_ties_by_hand():
    x = [1.0, 2.0, 2.0, 3.0]
    y = [1.0, 3.0, 2.0, 4.0]
    np.testing.assert_array_equal(fidelity.average_ranks(np.array(x)), [1, 2.5, 2.5, 4])
    # ranks x: 1, 2.5, 2.5, 4 -> centred -1.5, 0, 0, 1.5; y: 1, 3, 2, 4 -> -1.5, .5, -.5, 1.5
    expected = (1.5 * 1.5 + 1.5 * 1.5) / math.sqrt((1.5**2 * 2) * (1.5**2 * 2 + 0.5**2 * 2))
    assert fidelity.spearman(x, y) == pytest.approx(expected)


# -- linear CKA ------------------------------------------------------------------------------------


def cka_via_hsic(x, y):
    """The textbook form: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), K = X X^T, centring matrix H."""
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
    return np.trace(k @ l_) / math.sqrt(np.trace(k @ k) * np.trace(l_ @ l_))


def test_cka_is_one_under_identity_rotation_and_scaling():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 8))
    rotation, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    assert fidelity.linear_cka(x, x) == pytest.approx(1.0)
    assert fidelity.linear_cka(x, x @ rotation) == pytest.approx(1.0)
    assert fidelity.linear_cka(x, 3.7 * x + 2.0) == pytest.approx(1.0)  # scaled and shifted
    assert fidelity.linear_cka(torch.tensor(x, dtype=torch.float32), x) == pytest.approx(1.0, abs=1e-6)


def test_cka_of_independent_matrices_is_small():
    rng = np.random.default_rng(1)
    assert fidelity.linear_cka(rng.normal(size=(500, 5)), rng.normal(size=(500, 5))) < 0.1


def test_cka_matches_the_hsic_formula_with_different_widths():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(12, 3))
    y = x @ rng.normal(size=(3, 5)) + 0.5 * rng.normal(size=(12, 5))
    assert fidelity.linear_cka(x, y) == pytest.approx(cka_via_hsic(x, y), rel=1e-10)
    assert fidelity.linear_cka(x, y) == pytest.approx(fidelity.linear_cka(y, x), rel=1e-12)


def test_cka_rejects_mismatched_items_and_is_nan_for_constants():
    with pytest.raises(ValueError):
        fidelity.linear_cka(np.zeros((4, 2)), np.zeros((5, 2)))
    assert math.isnan(fidelity.linear_cka(np.ones((4, 2)), np.arange(8.0).reshape(4, 2)))


# -- k-nearest-neighbour overlap ---------------------------------------------------------------------


def test_knn_overlap_of_identical_embeddings_is_one():
    x = np.random.default_rng(3).normal(size=(30, 4))
    assert fidelity.knn_overlap(x, x, k=5) == 1.0
    assert fidelity.knn_overlap(x, x, k=5, chunk=7) == 1.0  # chunking changes nothing


def two_clusters(angles):
    """Points at `angles` in the e1-e2 plane, then the same in the e2-e3 plane: within-cluster
    cosines are >= cos(0.3) = 0.96, across clusters <= sin(0.3) = 0.30."""
    a = np.stack([np.cos(angles), np.sin(angles), np.zeros(len(angles))], 1)
    b = np.stack([np.zeros(len(angles)), np.cos(angles), np.sin(angles)], 1)
    return np.concatenate([a, b])


def test_knn_overlap_planted_clusters():
    # Two clusters of 3 (around +e1 and around +e2). Within a cluster, the reference orders the
    # neighbours one way, the other the opposite way. With k=1 a point's nearest neighbour is in
    # its cluster under both; with k=2 both cluster mates are chosen by both.
    reference = two_clusters(np.array([0.0, 0.10, 0.30]))  # nearest of items 0, 1, 2: 1, 0, 1
    other = two_clusters(np.array([0.0, 0.20, 0.30]))  # nearest of items 0, 1, 2: 1, 2, 1
    # k=1: items 0 and 2 (and 3, 5) agree, item 1 (and 4) does not -> 4/6
    assert fidelity.knn_overlap(reference, other, k=1) == pytest.approx(4 / 6)
    assert fidelity.knn_overlap(reference, other, k=2) == 1.0
    # widths may differ: other in 5 dimensions, padded with zeros, gives the same neighbours
    assert fidelity.knn_overlap(reference, np.pad(other, ((0, 0), (0, 2))), k=1) == pytest.approx(4 / 6)


def test_knn_overlap_clips_k_and_chance():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(5, 3)), rng.normal(size=(5, 2))
    assert fidelity.knn_overlap(a, b, k=100) == 1.0  # k -> 4: every other item
    assert fidelity.knn_overlap_chance(5, 100) == 1.0
    assert fidelity.knn_overlap_chance(11, 2) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        fidelity.knn_overlap(a[:1], b[:1])


# -- masked marginals ------------------------------------------------------------------------------


def test_sample_mutation_sites_is_deterministic_and_standard_only():
    sequences = ["MKXXTAY", "GS", "AAAAAAAAAA"]
    sites = fidelity.sample_mutation_sites(sequences, per_protein=3, seed=7)
    assert sites == fidelity.sample_mutation_sites(sequences, per_protein=3, seed=7)
    assert [s for s in sites if s[0] == 1] == [(1, 0), (1, 1)]  # shorter: every position
    for protein in (0, 2):
        positions = [p for i, p in sites if i == protein]
        assert len(positions) == len(set(positions)) == 3
        assert all(sequences[protein][p] in STANDARD_RESIDUES for p in positions)
    assert fidelity.sample_mutation_sites(["XXX"], per_protein=2, seed=0) == []


def hand_marginal(model, tokenizer, sequence, position):
    ids = tokenizer.encode(sequence)
    ids[position + 1] = tokenizer.mask_id
    with torch.no_grad():
        logits = model(ids[None], torch.ones_like(ids)[None])["logits"][0, position + 1]
    log_probs = torch.log_softmax(logits.double(), -1)
    columns = [tokenizer.vocab.index(a) for a in STANDARD_RESIDUES]
    wild_type = tokenizer.vocab.index(sequence[position])
    return (log_probs[columns] - log_probs[wild_type]).numpy()


def test_masked_marginals_match_a_hand_computation(tokenizer_and_model):
    tokenizer, model = tokenizer_and_model
    sites = [(0, 0), (0, 9), (1, 5), (2, 19), (3, 2)]
    scores = fidelity.masked_marginals(model, tokenizer, SEQUENCES, sites)
    assert scores.shape == (5, 20) and scores.dtype == np.float64
    for row, (protein, position) in enumerate(sites):
        expected = hand_marginal(model, tokenizer, SEQUENCES[protein], position)
        np.testing.assert_allclose(scores[row], expected, atol=1e-5, rtol=0)
        assert scores[row, STANDARD_RESIDUES.index(SEQUENCES[protein][position])] == 0.0
    assert np.abs(scores).max() > 1e-3  # the scores are not trivially zero


def test_masked_marginals_batched_equals_unbatched(tokenizer_and_model):
    tokenizer, model = tokenizer_and_model
    sites = fidelity.sample_mutation_sites(SEQUENCES, per_protein=4, seed=0)
    calls = []

    def counting_forward(input_ids, attention_mask):
        calls.append(input_ids.shape)
        return model(input_ids, attention_mask)

    batched = fidelity.masked_marginals(counting_forward, tokenizer, SEQUENCES, sites, max_tokens=30)
    assert len(calls) > 2 and all(rows * length <= 30 or rows == 1 for rows, length in calls)
    assert sum(rows for rows, _ in calls) == len(sites)
    calls.clear()
    whole = fidelity.masked_marginals(counting_forward, tokenizer, SEQUENCES, sites, max_tokens=10**6)
    assert len(calls) == 1 and calls[0][0] == len(sites)
    np.testing.assert_allclose(batched, whole, atol=1e-5, rtol=0)


def test_masked_marginals_window_long_sequences(tokenizer_and_model):
    tokenizer, model = tokenizer_and_model
    sequence = SEQUENCES[2]  # 21 residues; windows of 8
    assert fidelity.site_window(21, 1, 8) == (0, 8)
    assert fidelity.site_window(21, 10, 8) == (6, 14)
    assert fidelity.site_window(21, 20, 8) == (13, 21)
    assert fidelity.site_window(21, 20, None) == (0, 21)
    scores = fidelity.masked_marginals(model, tokenizer, [sequence], [(0, 1), (0, 10), (0, 19)], max_len=10)
    for row, (position, (start, end)) in enumerate([(1, (0, 8)), (10, (6, 14)), (19, (13, 21))]):
        expected = hand_marginal(model, tokenizer, sequence[start:end], position - start)
        np.testing.assert_allclose(scores[row], expected, atol=1e-5, rtol=0)


def test_masked_marginals_reject_non_standard_sites(tokenizer_and_model):
    tokenizer, model = tokenizer_and_model
    with pytest.raises(ValueError):
        fidelity.masked_marginals(model, tokenizer, SEQUENCES, [(2, 20)])  # an X
    with pytest.raises(ValueError):
        fidelity.masked_marginals(model, tokenizer, SEQUENCES, [(1, 6)])  # past the end


# -- agreement and the frequency baseline -----------------------------------------------------------


def test_mutation_effect_agreement_identical_negated_and_counts():
    rng = np.random.default_rng(5)
    sites = [(0, 1), (0, 4), (2, 0), (2, 3), (2, 7)]
    wild_types = np.array([0, 5, 19, 3, 3])
    scores = rng.normal(size=(5, 20))
    scores -= scores[np.arange(5), wild_types][:, None]  # wild-type column 0, as masked_marginals gives
    same = fidelity.mutation_effect_agreement(scores, scores.copy(), sites, wild_types)
    negated = fidelity.mutation_effect_agreement(scores, -scores, sites, wild_types)
    for key in ("spearman", "spearman_per_protein_mean", "spearman_within_position_mean"):
        assert same[key] == pytest.approx(1.0)
        assert negated[key] == pytest.approx(-1.0)
    assert (same["pairs"], same["sites"], same["proteins"]) == (5 * 19, 5, 2)


def test_mutation_effect_agreement_drops_the_wild_type_entries():
    # The teacher's scores equal the student's except at the wild-type entries: the agreement
    # must not see them.
    sites = [(0, 0), (1, 0)]
    wild_types = np.array([2, 7])
    student = np.tile(np.arange(20.0), (2, 1))
    teacher = student.copy()
    teacher[[0, 1], wild_types] = [1e6, -1e6]
    assert fidelity.mutation_effect_agreement(student, teacher, sites, wild_types)["spearman"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        fidelity.mutation_effect_agreement(student, teacher, sites, ["C", "K"])


def test_frequency_baseline_scores_by_hand():
    frequencies = np.arange(1.0, 21.0)  # counts: the scale cancels
    sites = [(0, 3), (1, 0)]
    wild_types = [0, 9]
    scores = fidelity.frequency_baseline_scores(frequencies, sites, wild_types)
    assert scores.shape == (2, 20)
    assert scores[0, 1] == pytest.approx(math.log(2.0))  # C (2) against A (1)
    assert scores[1, 0] == pytest.approx(math.log(1 / 10))  # A (1) against L (10)
    assert scores[0, 0] == scores[1, 9] == 0.0
    np.testing.assert_allclose(scores, fidelity.frequency_baseline_scores(frequencies / 20.0, sites, wild_types))


def test_frequency_baseline_against_itself_agrees_perfectly_within_a_protein():
    frequencies = np.random.default_rng(6).uniform(0.01, 0.1, size=20)
    sites, wild_types = [(0, 0), (0, 1)], np.array([4, 11])
    scores = fidelity.frequency_baseline_scores(frequencies, sites, wild_types)
    result = fidelity.mutation_effect_agreement(scores, scores, sites, wild_types)
    assert result["spearman_within_position_mean"] == pytest.approx(1.0)


# -- mean pooling ------------------------------------------------------------------------------------


def test_mean_pooled_equals_a_hand_loop():
    tokenizer = ResidueTokenizer.from_vocab(PROTBERT_VOCAB)
    sequences = ["MKTAY", "GS", "ACDEFGH"]
    input_ids, attention_mask = tokenizer.batch_encode(sequences)
    hidden = torch.randn(*input_ids.shape, 6, generator=torch.Generator().manual_seed(0))
    pooled = mean_pooled(hidden, attention_mask)
    for row, sequence in enumerate(sequences):
        expected = torch.stack([hidden[row, 1 + i] for i in range(len(sequence))]).mean(0)
        torch.testing.assert_close(pooled[row], expected)
    # an explicit special-token mask (the tokenizer's special ids) gives the same here
    special = torch.isin(input_ids, torch.tensor(tokenizer.special_ids))
    torch.testing.assert_close(mean_pooled(hidden, attention_mask, special), pooled)


def test_mean_pooled_row_without_residues_is_zero():
    hidden = torch.ones(1, 4, 3)
    pooled = mean_pooled(hidden, torch.tensor([[1, 1, 0, 0]]))  # start, end, padding
    torch.testing.assert_close(pooled, torch.zeros(1, 3))


def test_spearman_with_ties_matches_hand_computation():
    np.testing.assert_array_equal(fidelity.average_ranks(np.array([10, 20, 20, 5])), [2, 3.5, 3.5, 1])
    # ranks y = 1, 2, 3.5, 5, 3.5; centred products sum to 8; squares 10 and 9.5
    assert fidelity.spearman(np.arange(5), np.array([5, 6, 7, 8, 7])) == pytest.approx(8 / math.sqrt(95))
    assert fidelity.spearman(np.arange(6), np.arange(6) ** 3) == pytest.approx(1.0)
    assert fidelity.spearman(np.arange(6), -np.arange(6.0)) == pytest.approx(-1.0)
    assert fidelity.spearman(np.arange(3), np.ones(3)) is None
    assert fidelity.spearman(np.array([1.0]), np.array([2.0])) is None


def test_agreement_without_sites_is_undefined_not_an_error():
    empty = np.zeros((0, 20))
    result = fidelity.mutation_effect_agreement(empty, empty, [], np.zeros(0, dtype=np.int64))
    assert result["spearman"] is None and result["pairs"] == 0
