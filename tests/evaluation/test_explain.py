import torch

from userip.evaluation.explain import nearest_tokens


def test_nearest_tokens_ranks_by_cosine():
    vocab = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.7, 0.7]])
    soft = torch.tensor([[2.0, 0.1], [0.0, -3.0]])
    ids, sims = nearest_tokens(soft, vocab, k=2)
    assert ids[0].tolist() == [0, 3]
    expected = torch.nn.functional.cosine_similarity(soft[0:1], vocab[3:4]).item()
    assert abs(sims[0, 1].item() - expected) < 1e-6
    # Most similar to (0, -3) among the candidates {1, 2}: (-1, 0) (cos 0) beats (0, 1) (cos -1).
    ids, _ = nearest_tokens(soft[1:], vocab, k=1, candidate_ids=[1, 2])
    assert ids.tolist() == [[2]]


def test_nearest_tokens_rejects_mismatched_widths():
    import pytest

    with pytest.raises(ValueError, match="expected soft_embeds"):
        nearest_tokens(torch.zeros(2, 3), torch.zeros(4, 2))
