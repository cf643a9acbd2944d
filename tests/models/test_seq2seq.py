"""Seq2SeqLM: merging pre-trained stacks copies every tensor, logs the new ones; labels, causality, save/load;
a micro model learns to copy."""

import logging

import pytest
import torch
import torch.nn.functional as F
from model_helpers import (assert_same_loss_and_gradients, force_triton_kernels, random_batch,
                           tiny_config)

from fastlm.models import DecoderLM, EncoderLM, ModelConfig, Seq2SeqLM


def _pretrained(encoder_overrides=None, decoder_overrides=None):
    torch.manual_seed(0)
    encoder = EncoderLM(tiny_config(**(encoder_overrides or {})))
    decoder = DecoderLM(tiny_config(positional="rope", **(decoder_overrides or {})))
    return encoder, decoder


@pytest.mark.parametrize("cross_attention_init", ["random", "copy-self", "zero-out"])
@pytest.mark.parametrize("from_directories", [False, True])
def test_from_pretrained_copies_every_tensor(cross_attention_init, from_directories, tmp_path, caplog):
    encoder, decoder = _pretrained()
    sources = (encoder, decoder)
    if from_directories:
        encoder.save(tmp_path / "encoder")
        decoder.save(tmp_path / "decoder")
        sources = (tmp_path / "encoder", str(tmp_path / "decoder"))
    with caplog.at_level(logging.INFO, logger="fastlm.models"):
        model = Seq2SeqLM.from_pretrained(*sources, cross_attention_init=cross_attention_init)
    merged = model.state_dict()
    for name, tensor in encoder.body.state_dict().items():
        assert torch.equal(merged[f"encoder.{name}"], tensor), name
    for name, tensor in decoder.body.state_dict().items():
        assert torch.equal(merged[f"decoder.{name}"], tensor), name
    assert model.lm_head.weight is model.decoder.embeddings.token.weight
    new = [name for name in merged if ".cross_attn" in name]
    assert len(new) == 10 * decoder.config.n_layers
    log = caplog.text
    count = sum(merged[name].numel() for name in new)
    assert f"{len(new)} new tensors, {count:,} parameters" in log
    assert all(name in log for name in new)
    block = model.decoder.blocks[1]
    copied = torch.equal(block.cross_attn.q_proj.weight, block.self_attn.q_proj.weight)
    assert copied == (cross_attention_init == "copy-self")
    assert (block.cross_attn.out_proj.weight.abs().sum() == 0) == (cross_attention_init == "zero-out")


def test_widths_differ_adds_a_projection_and_share_embeddings_uses_the_encoders(caplog):
    encoder, decoder = _pretrained(decoder_overrides=dict(d_model=64, n_heads=2, d_ff=128))
    with caplog.at_level(logging.INFO, logger="fastlm.models"):
        model = Seq2SeqLM.from_pretrained(encoder, decoder)
    assert model.memory_proj.weight.shape == (64, 128)
    assert "memory_proj.weight" in caplog.text
    src, src_lengths = random_batch(model.encoder_config, [9, 4])
    tgt, tgt_lengths = random_batch(model.config, [5, 7], seed=1)
    assert torch.isfinite(model(src, tgt, src_lengths, tgt_lengths, labels=tgt).loss)
    with pytest.raises(ValueError, match="share_embeddings"):
        Seq2SeqLM.from_pretrained(encoder, decoder, share_embeddings=True)
    encoder, decoder = _pretrained()
    shared = Seq2SeqLM.from_pretrained(encoder, decoder, share_embeddings=True)
    embedding = shared.encoder.embeddings.token.weight
    assert shared.decoder.embeddings.token.weight is embedding and shared.lm_head.weight is embedding
    assert torch.equal(embedding, encoder.body.embeddings.token.weight)


def test_guards():
    encoder, decoder = _pretrained(decoder_overrides=dict(vocab_size=97))
    with pytest.raises(ValueError, match="vocab_size = 97"):
        Seq2SeqLM.from_pretrained(encoder, decoder)
    encoder, decoder = _pretrained()
    with pytest.raises(ValueError, match="cross_attention_init"):
        Seq2SeqLM.from_pretrained(encoder, decoder, cross_attention_init="zeros")
    with pytest.raises(ValueError, match="decoder of type EncoderLM"):
        Seq2SeqLM.from_pretrained(encoder, encoder)


def test_teacher_forcing_labels_causality_and_bad_input():
    torch.manual_seed(0)
    config = tiny_config(n_kv_heads=2)
    model = Seq2SeqLM(config, config).eval()
    src, src_lengths = random_batch(config, [9, 4])
    tgt, tgt_lengths = random_batch(config, [6, 3], seed=1)
    out = model(src, tgt, src_lengths, tgt_lengths, labels=tgt, return_logits=True)
    targets = tgt.masked_fill(torch.arange(6)[None] >= tgt_lengths[:, None], -100)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits.reshape(-1, config.vocab_size), targets.reshape(-1)))
    assert out.n_targets == 9
    # Position t reads <s>, tgt[:t]: changing tgt[t:] leaves positions <= t bitwise unchanged.
    changed = tgt.clone()
    changed[:, 2:] = 5
    after = model(src, changed, src_lengths, tgt_lengths, return_logits=True).logits
    assert torch.equal(after[:, :3], out.logits[:, :3])
    # The source padding is invisible.
    widened = torch.cat([src, torch.full((2, 5), 9)], dim=1)
    torch.testing.assert_close(model(widened, tgt, src_lengths, tgt_lengths, return_logits=True).logits, out.logits,
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="src_ids contains 96"):
        model(src.masked_fill(src == src[0, 0], 96), tgt)
    with pytest.raises(ValueError, match="tgt_lengths contains 7"):
        model(src, tgt, src_lengths, torch.tensor([7, 3]))
    with pytest.raises(ValueError, match="tgt_ids of shape \\(1, 6\\): expected 2 rows"):
        model(src, tgt[:1])


def test_save_load_round_trip(tmp_path):
    encoder, decoder = _pretrained(decoder_overrides=dict(d_model=64, n_heads=2))
    model = Seq2SeqLM.from_pretrained(encoder, decoder).eval()
    model.save(tmp_path)
    loaded = Seq2SeqLM.load(tmp_path).eval()
    assert loaded.config == model.config and loaded.encoder_config == model.encoder_config
    for (name, expected), (_, actual) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(actual, expected), name
    assert loaded.lm_head.weight is loaded.decoder.embeddings.token.weight
    src, src_lengths = random_batch(model.encoder_config, [9, 4])
    assert torch.equal(loaded(src, src, src_lengths, src_lengths, labels=src).loss,
                       model(src, src, src_lengths, src_lengths, labels=src).loss)


def test_flops_count_both_stacks_and_cross_attention():
    config = ModelConfig.preset("tiny", vocab_size=96)
    model = Seq2SeqLM(config, config)
    attention = 3 * 12 * config.n_layers * config.d_model * config.max_seq_len
    assert model.estimate_flops_per_token() == 6 * model.num_params() + attention
    assert model.estimate_flops_per_token(length=10) == 6 * model.num_params() + attention * 10 / config.max_seq_len


def test_fastlm_kernels_sdpa_and_eager_agree_with_cross_attention(monkeypatch):
    force_triton_kernels(monkeypatch)
    small = dict(vocab_size=64, d_model=32, n_heads=2, n_layers=1, d_ff=64)
    src, src_lengths = random_batch(tiny_config(**small), [12, 7], seed=3)
    tgt, tgt_lengths = random_batch(tiny_config(**small), [9, 5], seed=4)
    results = {}
    for impl in ("fastlm", "sdpa", "eager"):
        torch.manual_seed(1)
        model = Seq2SeqLM(tiny_config(attn_impl=impl, **small), tiny_config(attn_impl=impl, n_kv_heads=1, **small))
        loss = model(src, tgt, src_lengths, tgt_lengths, labels=tgt).loss
        loss.backward()
        results[impl] = loss.detach(), {name: p.grad for name, p in model.named_parameters()}
    assert_same_loss_and_gradients(results)


@pytest.mark.parametrize("attn_impl", ["fastlm", "sdpa"])
def test_zero_out_merge_computes_the_pretrained_decoder_at_step_0(attn_impl):
    # The merged decoder reads decoder_start_id then the target: with zero-out cross-attention its logits are the
    # pre-trained DecoderLM's on that same sequence, whatever the source; the other inits change them.
    from fastlm.generation import generate

    encoder, decoder = _pretrained(dict(attn_impl=attn_impl), dict(attn_impl=attn_impl))
    decoder.eval()
    src, src_lengths = random_batch(encoder.config, [9, 4])
    tgt, tgt_lengths = random_batch(decoder.config, [5, 7], seed=1)
    start = torch.full((2, 1), decoder.config.eos_id)
    pretrained = decoder(torch.cat([start, tgt[:, :-1]], dim=1), tgt_lengths, return_logits=True).logits
    real = torch.arange(tgt.shape[1])[None, :] < tgt_lengths[:, None]
    for init in ("zero-out", "random", "copy-self"):
        model = Seq2SeqLM.from_pretrained(encoder, decoder, cross_attention_init=init).eval()
        assert model.decoder_start_id == decoder.config.eos_id
        merged = model(src, tgt, src_lengths, tgt_lengths, return_logits=True).logits
        same = torch.allclose(merged[real], pretrained[real], rtol=0, atol=1e-5)
        assert same == (init == "zero-out"), init
    model = Seq2SeqLM.from_pretrained(encoder, decoder, cross_attention_init="zero-out").eval()
    translated = generate(model, src_ids=src, src_lengths=src_lengths, max_new_tokens=6)
    continued = generate(decoder, start, torch.ones(2, dtype=torch.long), max_new_tokens=6)
    assert torch.equal(translated, continued)


def test_a_micro_seq2seq_learns_to_copy_sequences_it_never_saw():
    """The whole translation path learns: trained on random token sequences (never the held-out ones), greedy
    generation copies each held-out sequence exactly. ~150 steps, a few seconds per 50 on one CPU thread."""
    from fastlm.generation import generate

    pad, bos, eos, first, vocab = 0, 1, 2, 3, 16
    config = tiny_config(vocab_size=vocab, pad_id=pad, bos_id=bos, eos_id=eos, d_model=64, n_layers=2, n_heads=4,
                         d_ff=128, max_seq_len=16)

    def sequences(count: int, generator: torch.Generator) -> list[list[int]]:
        lengths = torch.randint(3, 9, (count,), generator=generator).tolist()
        return [torch.randint(first, vocab, (length,), generator=generator).tolist() for length in lengths]

    def padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = torch.tensor([len(row) for row in rows])
        ids = torch.full((len(rows), int(lengths.max())), pad)
        for index, row in enumerate(rows):
            ids[index, :len(row)] = torch.tensor(row)
        return ids, lengths

    def copy_batch(rows: list[list[int]]) -> dict[str, torch.Tensor]:
        src_ids, src_lengths = padded([[bos, *row, eos] for row in rows])
        tgt_ids, tgt_lengths = padded([[*row, eos] for row in rows])
        labels = tgt_ids.masked_fill(torch.arange(tgt_ids.shape[1])[None, :] >= tgt_lengths[:, None], -100)
        return dict(src_ids=src_ids, src_lengths=src_lengths, tgt_ids=tgt_ids, tgt_lengths=tgt_lengths, labels=labels)

    held_out = sequences(64, torch.Generator().manual_seed(2))
    unseen = copy_batch(held_out)

    def copied_exactly(model: Seq2SeqLM) -> int:
        model.eval()
        with torch.no_grad():
            generated = generate(model, src_ids=unseen["src_ids"], src_lengths=unseen["src_lengths"],
                                 max_new_tokens=10).tolist()
        model.train()
        return sum(row[:row.index(eos)] == expected for row, expected in zip(generated, held_out) if eos in row)

    torch.manual_seed(0)
    model = Seq2SeqLM(config, config)
    optimizer = model.configure_optimizers(weight_decay=0.0, lr=3e-3)
    generator, exact = torch.Generator().manual_seed(1), [copied_exactly(model)]
    for step in range(1, 401):
        rows = [row for row in sequences(64, generator) if row not in held_out]
        loss = model(**copy_batch(rows)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            exact.append(copied_exactly(model))
            if exact[-1] == len(held_out):
                break
    assert exact[0] == 0 and exact[-1] == len(held_out), exact
