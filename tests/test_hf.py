"""fastlm.hf: exported models compute what fastlm computes (logits, loss, greedy generation) inside transformers, the
round trip fastlm -> transformers -> fastlm is bitwise exact, and what has no equivalent is refused by name."""

import json
import os
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")

from fastlm import hf  # noqa: E402
from fastlm.files import current_umask  # noqa: E402
from fastlm.generation import GENERATION_DEFAULTS, generate  # noqa: E402
from fastlm.models import DecoderLM, EncoderLM, ModelConfig, Seq2SeqLM  # noqa: E402
from fastlm.models.base import IGNORE_INDEX  # noqa: E402
from fastlm.tokenizer import Tokenizer  # noqa: E402

SENTENCES = ["나는 학교에 갑니다.", "I go to school.", "오늘 날씨가 좋네요.", "The weather is nice today."]


def micro_config(**overrides) -> ModelConfig:
    values = dict(vocab_size=61, d_model=16, n_layers=2, n_heads=2, d_ff=24, max_seq_len=16, dropout=0.0)
    return ModelConfig(**{**values, **overrides})


def randomised(model, seed: int = 0):
    """Every tensor drawn at a scale that makes layer norms, biases and the head matter (init leaves some at 0/1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return model.eval()


def padded_batch(config: ModelConfig, lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids that are never special (>= 4) up to each row's length, pad_id after it."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, config.vocab_size, (len(lengths), max(lengths)), generator=generator)
    lengths = torch.tensor(lengths)
    ids[torch.arange(ids.shape[1])[None] >= lengths[:, None]] = config.pad_id
    return ids, lengths


def real_tokens(lengths: torch.Tensor, width: int) -> torch.Tensor:
    return torch.arange(width)[None] < lengths[:, None]


def assert_same_state(first, second) -> None:
    ours, theirs = first.state_dict(), second.state_dict()
    assert list(ours) == list(theirs)
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype and torch.equal(ours[name], theirs[name]), name


lengths_lists = st.lists(st.integers(1, 12), min_size=1, max_size=3)


# kind: the model, its norm position and (rope) rotary positions; each maps to one architecture (see fastlm.hf).
@given(kind=st.sampled_from(["encoder-post", "encoder-pre", "encoder-pre-rope", "decoder-pre", "decoder-pre-rope"]),
       activation=st.sampled_from(["gelu", "relu"]), tie=st.booleans(), n_layers=st.integers(1, 2),
       n_heads=st.sampled_from([1, 2, 4]), pad_id=st.integers(0, 3), rope_theta=st.sampled_from([10000.0, 500.0, 1e6]),
       lengths=lengths_lists, seed=st.integers(0, 2**16))
def test_language_models_match_their_transformers_twin(kind, activation, tie, n_layers, n_heads, pad_id, rope_theta,
                                                        lengths, seed):
    arch, norm, *rotary = kind.split("-")
    if arch == "encoder" and kind != "encoder-pre":
        activation = "gelu"   # BERT's head and ESM apply GELU whatever the config: ReLU is refused (tested below)
    if kind == "encoder-pre-rope" or not rotary:
        # ESM: the base every version computes (others are refused, tested below); learned positions: unused, and
        # not kept by BERT or GPT-2, so it comes back as the default.
        rope_theta = hf.ESM_ROPE_THETA
    config = micro_config(norm_position=norm, activation=activation, tie_embeddings=tie, n_layers=n_layers,
                          n_heads=n_heads, pad_id=pad_id, bos_id=(pad_id + 1) % 4, eos_id=(pad_id + 2) % 4,
                          positional="rope" if rotary else "learned", rope_theta=rope_theta)
    model = randomised(EncoderLM(config) if arch == "encoder" else DecoderLM(config), seed)
    twin = hf.to_transformers(model)
    assert twin.config.model_type == hf.export_model_type(model)
    ids, lengths = padded_batch(config, lengths, seed)
    real = real_tokens(lengths, ids.shape[1])
    if arch == "encoder":   # a masked-LM batch: targets at some real positions only
        labels = ids.masked_fill(~real | (torch.rand(ids.shape, generator=torch.Generator().manual_seed(seed)) < 0.5),
                                 IGNORE_INDEX)
        labels[0, 0] = ids[0, 0]
    else:
        labels = ids.masked_fill(~real, IGNORE_INDEX)
    ours = model(ids, lengths, labels=ids if arch == "decoder" else labels, return_logits=True)
    theirs = twin(input_ids=ids, attention_mask=real.long(), labels=labels)
    torch.testing.assert_close(theirs.logits[real], ours.logits[real], atol=1e-4, rtol=1e-4)
    if arch == "encoder" or int(lengths.max()) > 1:   # a one-token causal batch has no target at all
        torch.testing.assert_close(theirs.loss, ours.loss, atol=1e-4, rtol=1e-4)
    assert_same_state(hf.from_transformers(twin), model)
    assert hf.from_transformers(twin).config == config


# transformers warns that its encoder-decoder loss differs from versions before 4.12: irrelevant here.
@pytest.mark.filterwarnings("ignore:Version v4.12.0:FutureWarning")
@settings(max_examples=16)   # each example builds two models and generates: the slowest property here
@given(encoder_norm=st.sampled_from(["post", "pre"]), decoder_norm=st.sampled_from(["pre", "post"]),
       positionals=st.sampled_from([("learned", "learned"), ("rope", "rope"), ("learned", "rope"),
                                    ("rope", "learned")]),
       rope_theta=st.sampled_from([10000.0, 500.0]), decoder_width=st.sampled_from([16, 8]),
       share_embeddings=st.booleans(), src_lengths=lengths_lists, seed=st.integers(0, 2**16))
def test_translation_model_matches_its_transformers_twin(encoder_norm, decoder_norm, positionals, rope_theta,
                                                         decoder_width, share_embeddings, src_lengths, seed):
    """An EncoderDecoderModel, or with rotary positions on either side fastlm's remote-code model."""
    share_embeddings = share_embeddings and decoder_width == 16
    if positionals == ("learned", "learned"):
        decoder_norm = "pre"   # GPT-2's only (a post-norm one is refused, tested below); the remote code has both
    # rope_theta only where it is read: an EncoderDecoderModel keeps no unused base to give back.
    encoder, decoder = ({"positional": positional, "rope_theta": rope_theta if positional == "rope" else 10000.0}
                        for positional in positionals)
    model = randomised(Seq2SeqLM(micro_config(norm_position=encoder_norm, **encoder),
                                 micro_config(d_model=decoder_width, n_heads=2, n_layers=1,
                                              norm_position=decoder_norm, **decoder),
                                 share_embeddings=share_embeddings), seed)
    twin = hf.to_transformers(model)
    assert twin.config.model_type == hf.export_model_type(model)
    src, src_lengths = padded_batch(model.encoder_config, src_lengths, seed)
    tgt, tgt_lengths = padded_batch(model.config, [max(1, 13 - n) for n in src_lengths.tolist()], seed + 1)
    src_real, tgt_real = real_tokens(src_lengths, src.shape[1]), real_tokens(tgt_lengths, tgt.shape[1])
    ours = model(src, tgt, src_lengths, tgt_lengths, labels=tgt, return_logits=True)
    theirs = twin(input_ids=src, attention_mask=src_real.long(), labels=tgt.masked_fill(~tgt_real, IGNORE_INDEX),
                  decoder_attention_mask=tgt_real.long())
    torch.testing.assert_close(theirs.logits[tgt_real], ours.logits[tgt_real], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(theirs.loss, ours.loss, atol=1e-4, rtol=1e-4)
    # Greedy translation: transformers returns the decoder start token first, then the same tokens and padding.
    expected = generate(model, src_ids=src, src_lengths=src_lengths, max_new_tokens=8)
    generated = twin.generate(input_ids=src, attention_mask=src_real.long(), max_new_tokens=8, do_sample=False,
                              num_beams=1)
    assert generated[:, 0].eq(model.decoder_start_id).all()
    assert torch.equal(generated[:, 1:], expected)
    back = hf.from_transformers(twin)
    assert_same_state(back, model)
    assert back.share_embeddings == share_embeddings
    assert (back.encoder_config, back.config) == (model.encoder_config, model.config)


@pytest.mark.parametrize("positional", ["learned", "rope"])   # GPT-2, GPT-NeoX
def test_causal_lm_greedy_generation_matches(positional):
    model = randomised(DecoderLM(micro_config(positional=positional, rope_theta=500.0)))
    prompt, _ = padded_batch(model.config, [5, 5], seed=3)
    expected = generate(model, prompt, max_new_tokens=8)
    generated = hf.to_transformers(model).generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                                   max_new_tokens=8, do_sample=False, num_beams=1)
    assert torch.equal(generated[:, 5:], expected)


def until_first_eos(ids: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    """Rows with pad_id after their first eos_id: transformers fills beam outputs with eos when pad_id is 0."""
    after_eos = (ids == eos_id).long().cumsum(dim=1).cumsum(dim=1) > 1
    return ids.masked_fill(after_eos, pad_id)


# Seeds where early stopping matters; rope: GPT-NeoX and fastlm's remote-code translation model.
@pytest.mark.parametrize("kind, positional, seed", [("seq2seq", "learned", 1), ("decoder", "learned", 9),
                                                    ("seq2seq", "rope", 3), ("decoder", "rope", 14)])
def test_transformers_generate_with_the_exported_settings_is_fastlms_beam_search(kind, positional, seed):
    """generate() without options, i.e. with the generation config of the export, returns fastlm's beam search
    token for token. The README's snippet once looped where `fastlm translate` stopped: transformers' own default is
    early_stopping=False, and it matters for these models (checked, so the test keeps covering that case)."""
    # 13 tokens make </s> likely enough that hypotheses end at different steps; positions leave the default
    # max_new_tokens uncapped after the longest prompt.
    config = micro_config(vocab_size=13, max_seq_len=GENERATION_DEFAULTS.max_new_tokens + 8, positional=positional,
                          rope_theta=500.0)
    lengths = [5, 9, 3, 8, 1, 6]
    if kind == "seq2seq":
        model = randomised(Seq2SeqLM(config, replace(config, n_layers=1)), seed)
        src, src_lengths = padded_batch(config, lengths, seed)
        inputs = dict(src_ids=src, src_lengths=src_lengths)
        generated = hf.to_transformers(model).generate(input_ids=src,
                                                       attention_mask=real_tokens(src_lengths, src.shape[1]).long())
        prompt_width = 1   # the decoder start token
    else:
        model = randomised(DecoderLM(config), seed)
        ids, prompt_lengths = padded_batch(config, lengths, seed)
        inputs = dict(input_ids=ids, lengths=prompt_lengths)
        # transformers continues prompts padded on the left, as the exported tokenizer pads them.
        prompt_width = ids.shape[1]
        padding = prompt_width - prompt_lengths
        left = torch.stack([row.roll(int(n)) for row, n in zip(ids, padding)])
        left_mask = torch.arange(prompt_width)[None] >= padding[:, None]
        generated = hf.to_transformers(model).generate(input_ids=left, attention_mask=left_mask.long())
    expected = generate(model, **inputs, strategy="beam")
    theirs = generated[:, prompt_width:]
    assert theirs.shape == expected.shape
    assert torch.equal(until_first_eos(theirs, config.eos_id, config.pad_id), expected)
    assert not torch.equal(generate(model, **inputs, strategy="beam", early_stopping=False), expected)


@pytest.mark.parametrize("positional", ["learned", "rope"])
def test_round_trip_keeps_bfloat16_weights_exactly(positional):
    model = randomised(Seq2SeqLM(micro_config(positional=positional), micro_config(positional=positional)))
    twin = hf.to_transformers(model.to(torch.bfloat16))
    assert twin.dtype == torch.bfloat16
    assert_same_state(hf.from_transformers(twin), model)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(SENTENCES * 10, vocab_size=300)


def sized(tokenizer: Tokenizer, **overrides) -> ModelConfig:
    return micro_config(**{"vocab_size": tokenizer.vocab_size, "pad_id": tokenizer.pad_id, "bos_id": tokenizer.bos_id,
                           "eos_id": tokenizer.eos_id, "max_seq_len": 32, **overrides})


def remote_code_file() -> Path:
    from fastlm.hf_remote import modeling_fastlm
    return Path(modeling_fastlm.__file__)


@pytest.mark.parametrize("kind", ["encoder-post", "encoder-pre", "encoder-pre-rope", "decoder", "decoder-rope",
                                  "seq2seq", "seq2seq-rope"])
def test_exported_directory_loads_with_auto_classes_and_imports_back(kind, tokenizer, tmp_path):
    arch, *variant = kind.split("-")
    rotary = {"positional": "rope"} if variant[-1:] == ["rope"] else {}
    if arch == "seq2seq":
        model = Seq2SeqLM(sized(tokenizer, norm_position="post", **rotary), sized(tokenizer, **rotary))
    elif arch == "decoder":
        model = DecoderLM(sized(tokenizer, **rotary))
    else:
        model = EncoderLM(sized(tokenizer, norm_position=variant[0], **rotary))
    model = randomised(model)
    directory = hf.export_model(model, tokenizer, tmp_path / "export")
    loader = {"encoder": transformers.AutoModelForMaskedLM, "decoder": transformers.AutoModelForCausalLM,
              "seq2seq": transformers.AutoModelForSeq2SeqLM}[arch]
    # As the README loads a translator: remote code is allowed, and used only by the rotary one.
    loaded = loader.from_pretrained(directory, local_files_only=True, trust_remote_code=arch == "seq2seq")
    assert_same_state(hf.from_transformers(loaded), model)
    assert_same_state(hf.import_model(directory), model)
    carries_code = hf.export_model_type(model) == hf.REMOTE_SEQ2SEQ
    assert (directory / "modeling_fastlm.py").is_file() == carries_code == (kind == "seq2seq-rope")
    if carries_code:
        assert (directory / "modeling_fastlm.py").read_bytes() == remote_code_file().read_bytes()
    # The tokenizer reads the model's config, whose class a rotary translator's export brings.
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True,
                                                              trust_remote_code=arch == "seq2seq")
    wrapped = arch != "decoder"   # encoder inputs are <s> text </s>, as fastlm trains on them
    for text in SENTENCES:
        ids = tokenizer.encode(text)
        assert hf_tokenizer(text)["input_ids"] == ([tokenizer.bos_id, *ids, tokenizer.eos_id] if wrapped else ids)
    assert hf_tokenizer.pad_token_id == tokenizer.pad_id and hf_tokenizer.eos_token_id == tokenizer.eos_id
    assert hf_tokenizer.mask_token_id == tokenizer.mask_id
    if arch in ("decoder", "seq2seq"):
        expected = {**asdict(GENERATION_DEFAULTS), "max_new_tokens": 32}   # capped at the decoder's max_seq_len
        # A fastlm default that transformers does not know would be lost: it needs a mapping in the export.
        assert [name for name in expected if not hasattr(transformers.GenerationConfig(), name)] == []
        settings = transformers.GenerationConfig.from_pretrained(directory, local_files_only=True)
        assert {name: getattr(settings, name) for name in expected} == expected
    if arch == "seq2seq":   # the README's snippet: tokenizer, Auto class, generate() without options
        batch = hf_tokenizer(SENTENCES, padding=True, return_tensors="pt")
        theirs = loaded.generate(**batch)[:, 1:]
        ours = generate(model, src_ids=batch["input_ids"], src_lengths=batch["attention_mask"].sum(dim=1),
                        strategy="beam", max_new_tokens=32)
        assert torch.equal(until_first_eos(theirs, tokenizer.eos_id, tokenizer.pad_id), ours)


def test_the_remote_code_runs_where_fastlm_cannot_be_imported(tokenizer, tmp_path):
    """The exported model file imports torch and transformers only: in a process where `import fastlm` fails, the
    directory still loads and translates as fastlm does."""
    rotary = {"positional": "rope", "rope_theta": 500.0}
    model = randomised(Seq2SeqLM(sized(tokenizer, **rotary), sized(tokenizer, d_model=8, **rotary)), seed=5)
    directory = hf.export_model(model, tokenizer, tmp_path / "export")
    src, src_lengths = padded_batch(model.encoder_config, [9, 4, 6], seed=5)
    script = (
        "import json, sys\n"
        "sys.modules['fastlm'] = None   # any import of fastlm, or of a module in it, now fails\n"
        "import torch, transformers\n"
        "model = transformers.AutoModelForSeq2SeqLM.from_pretrained(sys.argv[1], trust_remote_code=True,\n"
        "                                                           local_files_only=True)\n"
        "src, mask = (torch.tensor(json.loads(argument)) for argument in sys.argv[2:])\n"
        "print(json.dumps(model.generate(input_ids=src, attention_mask=mask).tolist()))\n")
    mask = real_tokens(src_lengths, src.shape[1]).long()
    environment = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    finished = subprocess.run([sys.executable, "-c", script, str(directory), json.dumps(src.tolist()),
                               json.dumps(mask.tolist())], capture_output=True, text=True, cwd=tmp_path,
                              env=environment, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    theirs = torch.tensor(json.loads(finished.stdout.splitlines()[-1]))[:, 1:]
    ours = generate(model, src_ids=src, src_lengths=src_lengths, strategy="beam", max_new_tokens=32)
    assert torch.equal(until_first_eos(theirs, tokenizer.eos_id, tokenizer.pad_id), ours)


def test_export_refuses_a_non_empty_directory_unless_told(tokenizer, tmp_path):
    model = EncoderLM(sized(tokenizer))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        hf.export_model(model, tokenizer, tmp_path / "out")
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    hf.export_model(model, tokenizer, tmp_path / "out", overwrite=True)
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [
        "config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    # Readable by the machine's other users as every file fastlm writes (safetensors alone would make it 0o600).
    assert (tmp_path / "out" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~current_umask()
    assert [path.name for path in tmp_path.iterdir()] == ["out"]   # no staging directory left behind


def test_export_refuses_another_tokenizer(tokenizer, tmp_path):
    other = Tokenizer.train(SENTENCES * 10, vocab_size=290)
    with pytest.raises(ValueError, match="vocab_size = 300 differs from the tokenizer's 290"):
        hf.export_model(EncoderLM(sized(tokenizer)), other, tmp_path / "out")
    with pytest.raises(ValueError, match="eos_id = 3 differs"):
        hf.export_model(EncoderLM(sized(tokenizer, eos_id=3)), tokenizer, tmp_path / "out")


@pytest.mark.parametrize("make, message", [
    (lambda: EncoderLM(micro_config(positional="rope", norm_position="post")),
     "EncoderLM ModelConfig.positional = 'rope' has no equivalent in BERT"),
    (lambda: EncoderLM(micro_config(positional="rope", rope_theta=500.0)),
     "rope_theta = 500.0 has no portable equivalent in ESM: expected 10000.0"),
    (lambda: EncoderLM(micro_config(positional="rope", activation="relu")), "activation = 'relu' .* ESM"),
    (lambda: DecoderLM(micro_config(positional="rope", n_kv_heads=1)), "n_kv_heads = 1 has no equivalent in GPT-NeoX"),
    (lambda: DecoderLM(micro_config(positional="rope", activation="swiglu")), "swiglu' has no equivalent in GPT-NeoX"),
    (lambda: Seq2SeqLM(micro_config(positional="rope"), micro_config(activation="swiglu")),
     "Seq2SeqLM decoder ModelConfig.activation = 'swiglu' has no equivalent in fastlm's remote code"),
    (lambda: Seq2SeqLM(micro_config(positional="sinusoidal"), micro_config(positional="rope")),
     "Seq2SeqLM encoder ModelConfig.positional = 'sinusoidal' has no equivalent in fastlm's remote code"),
    (lambda: DecoderLM(micro_config(positional="sinusoidal")), "positional = 'sinusoidal' has no equivalent in GPT-2"),
    (lambda: DecoderLM(micro_config(activation="swiglu")), "activation = 'swiglu'"),
    (lambda: DecoderLM(micro_config(n_kv_heads=1)), "n_kv_heads = 1 .*no grouped-query attention"),
    (lambda: DecoderLM(micro_config(norm_position="post")), "norm_position = 'post' has no equivalent in GPT-2"),
    (lambda: EncoderLM(micro_config(norm_position="post", activation="relu")), "activation = 'relu' .* BERT"),
    (lambda: Seq2SeqLM(micro_config(), micro_config(norm_position="post")), "Seq2SeqLM decoder .*norm_position"),
])
def test_configs_without_an_equivalent_are_refused_by_name(make, message):
    with pytest.raises(ValueError, match=message):
        hf.to_transformers(make())


def test_the_remote_code_refuses_a_config_it_does_not_compute():
    """A hand-edited config.json of a fastlm-seq2seq export: the model file names what it cannot compute rather than
    computing something else."""
    from fastlm.hf_remote import modeling_fastlm

    stack = micro_config(positional="rope").to_dict()
    config = modeling_fastlm.FastlmSeq2SeqConfig(encoder_stack=stack, decoder_stack={**stack, "activation": "swiglu"})
    with pytest.raises(ValueError, match="decoder_stack activation = 'swiglu': expected one of"):
        modeling_fastlm.FastlmSeq2SeqForConditionalGeneration(config)


def test_a_bert_encoder_in_a_translation_model_may_use_relu():
    model = randomised(Seq2SeqLM(micro_config(norm_position="post", activation="relu"), micro_config()))
    assert_same_state(hf.from_transformers(hf.to_transformers(model)), model)


def test_bert_token_types_fold_into_the_positions():
    """A BERT checkpoint trained elsewhere has a non-zero type-0 embedding: fastlm adds it to every position."""
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=24, max_position_embeddings=16, bos_token_id=1,
                                     eos_token_id=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    bert = transformers.BertForMaskedLM(config).eval()
    assert bert.bert.embeddings.token_type_embeddings.weight[0].abs().sum() > 0
    model = hf.from_transformers(bert)
    ids, lengths = padded_batch(model.config, [7, 3], seed=0)
    real = real_tokens(lengths, ids.shape[1])
    torch.testing.assert_close(model(ids, lengths, return_logits=True).logits[real],
                               bert(input_ids=ids, attention_mask=real.long()).logits[real], atol=1e-4, rtol=1e-4)


def test_a_checkpoint_without_its_mlm_head_imports_with_a_warning(tmp_path, caplog):
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=24, max_position_embeddings=16, bos_token_id=1, eos_token_id=2)
    body = transformers.BertModel(config)
    body.save_pretrained(tmp_path)
    model = hf.import_model(tmp_path)
    assert torch.equal(model.body.embeddings.token.weight, body.embeddings.word_embeddings.weight)
    assert "no MLM head in the checkpoint (cls.predictions.bias" in caplog.text


@pytest.mark.parametrize("hf_config, message", [
    (lambda: transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=16, bos_token_id=1,
                                     eos_token_id=2, pad_token_id=0),
     "gpt2 config activation_function = 'gelu_new' has no fastlm equivalent"),
    (lambda: transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=16, bos_token_id=1,
                                     eos_token_id=2, activation_function="gelu"),
     "gpt2 config pad_token_id = None"),
    (lambda: transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=24, bos_token_id=1, eos_token_id=2, hidden_act="gelu_new"),
     "bert config hidden_act = 'gelu_new'"),
    # GPT-NeoX's defaults: attention and feed-forward side by side, a quarter of each head rotated.
    (lambda: transformers.GPTNeoXConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=24, pad_token_id=0, bos_token_id=1, eos_token_id=2),
     "gpt_neox config use_parallel_residual = True has no fastlm equivalent"),
    (lambda: transformers.GPTNeoXConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=24, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                        use_parallel_residual=False),
     "gpt_neox config rope_parameters = .*'partial_rotary_factor': 0.25.* expected rope_type 'default' with "
     "partial_rotary_factor 1.0"),
    (lambda: transformers.EsmConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=24, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                    position_embedding_type="rotary", token_dropout=True),
     "esm config token_dropout = True has no fastlm equivalent"),
])
def test_transformers_configs_without_an_equivalent_are_refused_by_name(hf_config, message, tmp_path):
    config = hf_config()
    class_name, _ = hf.MODEL_TYPES[config.model_type]
    getattr(transformers, class_name)(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        hf.import_model(tmp_path)


def test_import_names_an_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "roberta-prelayernorm"}))
    with pytest.raises(ValueError, match="model_type = 'roberta-prelayernorm': expected one of"):
        hf.import_model(tmp_path)


def test_missing_transformers_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[hf\]"'):
        hf.to_transformers(DecoderLM(micro_config()))
