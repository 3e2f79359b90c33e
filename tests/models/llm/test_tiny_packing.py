"""The tiny LLM warm-up's packed step: one LLM pass over a step's text and context sequences packed
several to a row gives the losses and gradients of one padded batch per group, as the warm-up
computed them before it packed."""
import random

import pytest
import torch
import torch.nn.functional as F

from lavis_lite.models.llm.tiny import CaptionEncoder, _pack, _packed_losses, _pad


def padded_losses(model, encoder, bos, text, halves):
    """The reference: the text group and each context half as its own right-padded batch."""
    embed = model.get_input_embeddings()
    ids, mask = _pad(text)
    logits = model(input_ids=ids, attention_mask=mask).logits
    labels = ids.masked_fill(mask == 0, -100)
    losses = [F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)]
    for sources, pairs in halves:
        source, source_mask = _pad(sources)
        vectors = encoder(embed(source), source_mask == 0)
        ids, mask = _pad([prompt + target for prompt, target in pairs])
        labels = ids.masked_fill(mask == 0, -100)
        for row, (prompt, _) in enumerate(pairs):
            labels[row, : len(prompt)] = -100
        k = vectors.shape[1]
        inputs = torch.cat([embed(torch.full((len(pairs), 1), bos)), vectors, embed(ids)], 1)
        attention = torch.cat([torch.ones(len(pairs), 1 + k, dtype=mask.dtype), mask], 1)
        logits = model(inputs_embeds=inputs, attention_mask=attention).logits[:, k:-1]
        losses.append(F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100))
    return losses


def test_pack_places_every_sequence_once_in_rows_as_wide_as_the_longest():
    lengths = [5, 9, 3, 4, 9, 1, 6, 2]
    places, rows, width = _pack(lengths)
    assert width == 9 and rows < len(lengths)
    used = set()
    for (row, start), length in zip(places, lengths):
        slots = {(row, col) for col in range(start, start + length)}
        assert start + length <= width and 0 <= row < rows and not slots & used
        used |= slots


def test_packed_losses_and_gradients_equal_one_padded_batch_per_group():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1)).train()
    encoder = CaptionEncoder(16, 2, num_vectors=3).train()
    rng = random.Random(0)

    def ids(low, high):
        return [rng.randrange(3, 20) for _ in range(rng.randint(low, high))]

    text = [ids(2, 12) for _ in range(5)]
    halves = [([ids(1, 6) for _ in range(n)], [(ids(0, 4), ids(1, 5)) for _ in range(n)]) for n in (4, 2)]
    params = [*model.parameters(), *encoder.parameters()]

    grads = []
    for losses_fn in (padded_losses, _packed_losses):
        losses = losses_fn(model, encoder, 1, text, halves)
        grads.append(torch.autograd.grad(sum(losses), params))
        if losses_fn is padded_losses:
            expected = [loss.item() for loss in losses]
    assert [loss.item() for loss in losses] == pytest.approx(expected, rel=1e-5)
    for reference, packed in zip(*grads):
        torch.testing.assert_close(packed, reference, rtol=1e-4, atol=1e-6)


def test_a_group_without_sequences_gives_a_zero_loss():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    encoder = CaptionEncoder(16, 2, num_vectors=3)
    text_loss, context_loss = _packed_losses(model, encoder, 1, [], [([[5, 6]], [([], [7, 2])])])
    assert text_loss.item() == 0 and context_loss.item() > 0
