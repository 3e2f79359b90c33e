"""ITC / ITM / ITG loss functions against LAVIS's formulas; hard-negative sampling; image id codes."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lavis_lite.models import losses


def normalised(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_image_id_codes():
    codes = losses.image_ids_to_tensor(["coco_1", "coco_2", "coco_1", 7, torch.tensor(9)])
    assert codes.dtype == torch.long and codes[0] == codes[2] and codes[0] != codes[1]
    assert codes[3] == 7 and codes[4] == 9
    assert torch.equal(losses.image_ids_to_tensor(torch.tensor([[3], [4]])), torch.tensor([3, 4]))
    for bad in ([1.5], [None], [True]):
        with pytest.raises(TypeError):
            losses.image_ids_to_tensor(bad)
    # the same code in another process (Python's own hash() would differ)
    code = subprocess.run(
        [sys.executable, "-c", "import importlib.util as u, sys; s = u.spec_from_file_location('l', sys.argv[1]); "
                               "m = u.module_from_spec(s); s.loader.exec_module(m); "
                               "print(int(m.image_ids_to_tensor(['coco_123456'])[0]))", losses.__file__],
        capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": "123"},
    ).stdout.strip()
    assert int(code) == int(losses.image_ids_to_tensor(["coco_123456"])[0])


def test_positive_mask():
    mask = losses.positive_mask(2, rank=1, world_size=3)
    assert mask.tolist() == [[False, False, True, False, False, False], [False, False, False, True, False, False]]
    ids_all = torch.tensor([5, 6, 5, 7])
    mask = losses.positive_mask(2, rank=1, world_size=2, image_ids=ids_all[2:], image_ids_all=ids_all)
    assert mask.tolist() == [[True, False, True, False], [False, False, False, True]]


def test_itc_matches_lavis_cross_entropy_with_unique_ids():
    b, world, rank, q, d = 3, 2, 1, 4, 8
    image_all, text_all = normalised(b * world, q, d), normalised(b * world, d, seed=1)
    local = slice(rank * b, rank * b + b)
    temp = torch.tensor(0.07)
    sim_i2t, sim_t2i = losses.itc_similarities(image_all[local], text_all[local], image_all, text_all, temp)
    # LAVIS: matmul then max over queries, / temp
    lavis_i2t = torch.matmul(image_all[local].unsqueeze(1), text_all.unsqueeze(-1)).squeeze(-1).max(-1)[0] / temp
    lavis_t2i = torch.matmul(text_all[local].unsqueeze(1).unsqueeze(1), image_all.permute(0, 2, 1)).squeeze(2).max(-1)[0] / temp
    torch.testing.assert_close(sim_i2t, lavis_i2t)
    torch.testing.assert_close(sim_t2i, lavis_t2i)
    targets = torch.arange(rank * b, rank * b + b)
    expected = (F.cross_entropy(lavis_i2t, targets, label_smoothing=0.1)
                + F.cross_entropy(lavis_t2i, targets, label_smoothing=0.1)) / 2
    for positive in (losses.positive_mask(b, rank, world),
                     losses.positive_mask(b, rank, world, torch.tensor([10, 11, 12]), torch.arange(6) + 7)):
        torch.testing.assert_close(losses.itc_loss(sim_i2t, sim_t2i, positive), expected)


def test_itc_with_repeated_ids_uses_lavis_soft_targets():
    sim_i2t, sim_t2i = torch.randn(3, 6), torch.randn(3, 6)
    ids_all = torch.tensor([1, 2, 1, 3, 2, 4])
    ids = ids_all[:3]
    pos = torch.eq(ids.view(-1, 1), ids_all.view(1, -1)).float()  # LAVIS blip2_qformer.py, image_id branch
    sim_targets = pos / pos.sum(1, keepdim=True)
    sim_targets = 0.9 * sim_targets + 0.1 * torch.ones_like(sim_targets) / sim_targets.size(1)
    expected = (-torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_targets, dim=1).mean()
                - torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_targets, dim=1).mean()) / 2
    positive = losses.positive_mask(3, 0, 2, ids, ids_all)
    torch.testing.assert_close(losses.itc_loss(sim_i2t, sim_t2i, positive), expected)
    unique = losses.positive_mask(3, 0, 2)
    assert not torch.allclose(losses.itc_loss(sim_i2t, sim_t2i, unique), expected)


def test_hard_negatives_never_positive_and_follow_similarity():
    draws, b = 4000, 3
    ids_all = torch.tensor([1, 2, 1, 3, 4, 2])  # rows 0 and 2 share an image; row 1 shares with column 5
    positive = losses.positive_mask(b, 0, 2, ids_all[:b], ids_all)
    sim = torch.tensor([[5.0, 4.0, 9.0, 3.0, 0.0, 1.0],
                        [1.0, 9.0, 2.0, 4.0, 0.0, 9.0],
                        [9.0, 0.0, 9.0, 1.0, 2.0, 3.0]])
    generator = torch.Generator().manual_seed(0)
    picks = losses.sample_hard_negatives(sim.repeat(draws, 1), positive.repeat(draws, 1), generator).view(draws, b)
    for row in range(b):
        chosen = picks[:, row]
        assert not positive[row, chosen].any(), f"row {row} drew a positive"
        assert set(chosen.tolist()) == set((~positive[row]).nonzero().flatten().tolist())  # every negative occurs
        counts = torch.bincount(chosen, minlength=6).float() / draws
        weights = losses.hard_negative_weights(sim, positive)[row]
        torch.testing.assert_close(counts, weights, atol=0.03, rtol=0)  # drawn in proportion to softmax(sim)
    assert torch.equal(losses.hardest_negatives(sim, positive), torch.tensor([1, 3, 5]))
    generator.manual_seed(5)
    first = losses.sample_hard_negatives(sim, positive, generator)
    generator.manual_seed(5)
    assert torch.equal(first, losses.sample_hard_negatives(sim, positive, generator))


def test_without_ids_only_the_pair_itself_is_excluded():
    positive = losses.positive_mask(4, rank=1, world_size=2)
    sim = torch.randn(4, 8)
    picks = losses.sample_hard_negatives(sim.repeat(500, 1), positive.repeat(500, 1)).view(500, 4)
    assert not (picks == torch.arange(4, 8)).any()
    weights = losses.hard_negative_weights(sim, positive)
    assert (weights[positive] == 0).all() and (weights[~positive] > 0).all()


def test_no_negative_raises():
    positive = losses.positive_mask(2, 0, 1, torch.tensor([3, 3]), torch.tensor([3, 3]))
    with pytest.raises(ValueError, match="no negative"):
        losses.sample_hard_negatives(torch.randn(2, 2), positive)


def test_itm_loss_labels():
    logits = torch.randn(6, 2)
    expected = F.cross_entropy(logits, torch.tensor([1, 1, 0, 0, 0, 0]))
    torch.testing.assert_close(losses.itm_loss(logits, num_positive=2), expected)


def test_lm_inputs_and_loss():
    ids = torch.tensor([[101, 7, 8, 102, 0], [101, 9, 102, 0, 0]])
    decoder_ids, labels = losses.lm_inputs(ids, bos_token_id=30522, pad_token_id=0)
    assert decoder_ids.tolist() == [[30522, 7, 8, 102, 0], [30522, 9, 102, 0, 0]]
    assert labels.tolist() == [[30522, 7, 8, 102, -100], [30522, 9, 102, -100, -100]]
    logits = torch.randn(2, 5, 30523)
    # LAVIS BertLMHeadModel: shift by one, CrossEntropyLoss(label_smoothing=0.1), -100 ignored
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 30523), labels[:, 1:].reshape(-1), label_smoothing=0.1)
    torch.testing.assert_close(losses.lm_loss(logits, labels), expected)
    kept = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]  # positions whose next token is real
    manual = torch.stack([
        0.9 * F.cross_entropy(logits[r, t][None], labels[r, t + 1][None])
        + 0.1 * -F.log_softmax(logits[r, t], -1).mean() for r, t in kept]).mean()
    torch.testing.assert_close(losses.lm_loss(logits, labels), manual)
