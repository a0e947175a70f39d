"""The student model and its checkpoints: properties of RoPE, masking, tying and file handling."""

import json

import pytest
import torch

from architecture import (
    CheckpointError,
    ResidueTokenizer,
    Rotary,
    Student,
    StudentConfig,
    apply_rotary,
    load_student,
    read_safetensors,
    save_student,
)

PROTBERT_VOCAB = "[PAD] [UNK] [CLS] [SEP] [MASK] L A G V E S I K R D T P N Q F Y M H C W X U B Z O".split()


@pytest.fixture(scope="module")
def tokenizer():
    return ResidueTokenizer.from_vocab(PROTBERT_VOCAB)


def tiny_student(tokenizer, **sizes):
    torch.manual_seed(0)
    sizes = {"d_model": 32, "num_heads": 2, "num_layers": 2, **sizes}
    return Student(StudentConfig.from_tokenizer(tokenizer, **sizes))


@pytest.fixture
def model(tokenizer):
    return tiny_student(tokenizer).eval()


@pytest.fixture
def batch(tokenizer):
    return tokenizer.batch_encode(["MKTAYIAKQR", "GSH", "ACDEFGHIKLMNPQ"])


# -- rotary embeddings -------------------------------------------------------------------------


def test_rotary_score_depends_only_on_offset():
    torch.manual_seed(0)
    head_dim, length = 16, 64
    q, k = torch.randn(head_dim), torch.randn(head_dim)
    cos, sin = Rotary(head_dim, 10000.0)(length)
    q_at = apply_rotary(q.expand(length, head_dim), cos, sin)  # q placed at every position
    k_at = apply_rotary(k.expand(length, head_dim), cos, sin)
    scores = q_at @ k_at.T  # scores[m, n] = q_m . k_n

    for offset in (0, 1, 7, -5, 40):
        pairs = [(m, m - offset) for m in range(length) if 0 <= m - offset < length]
        same = torch.stack([scores[m, n] for m, n in pairs])
        torch.testing.assert_close(same, same[0].expand_as(same), atol=1e-4, rtol=0)
    # Offset 0 is the plain dot product; other offsets give other scores.
    torch.testing.assert_close(scores[5, 5], q @ k)
    by_offset = torch.stack([scores[10, 10 - d] for d in (0, 1, 2, 5, 10)])
    assert (by_offset[:, None] - by_offset[None, :]).abs().add(torch.eye(5)).min() > 1e-3


def test_rotary_table_grows_and_is_not_saved():
    rotary = Rotary(8, 10000.0)
    cos, _ = rotary(10)
    assert cos.shape == (10, 8)
    long_cos, _ = rotary(100)
    assert rotary.cos.shape == (100, 8)
    torch.testing.assert_close(long_cos[:10], cos)  # growing does not move earlier positions
    assert rotary.state_dict() == {}


# -- attention and masking ---------------------------------------------------------------------


def test_padding_does_not_change_logits(model, tokenizer):
    ids = tokenizer.encode("MKTAYIAKQRQISFVKSHF")[None]
    with torch.no_grad():
        alone = model(ids)["logits"]
        padded_ids, mask = tokenizer.batch_encode(["MKTAYIAKQRQISFVKSHF"], pad_to=40)
        padded = model(padded_ids, mask)["logits"]
        in_batch = model(*tokenizer.batch_encode(["GSH", "MKTAYIAKQRQISFVKSHF", "A" * 50]))["logits"]
    n = ids.shape[1]
    torch.testing.assert_close(padded[:, :n], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(in_batch[1:2, :n], alone, atol=1e-5, rtol=0)
    assert torch.isfinite(padded).all() and torch.isfinite(in_batch).all()  # pad rows too


def test_attention_mask_defaults_to_non_pad(model, batch):
    input_ids, mask = batch
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids)["logits"], model(input_ids, mask)["logits"])


def test_all_padding_row_stays_finite(model, tokenizer):
    input_ids = torch.full((2, 6), tokenizer.pad_id)
    input_ids[0, :3] = tokenizer.encode("A")
    with torch.no_grad():
        for attentions in (False, True):
            assert torch.isfinite(model(input_ids, output_attentions=attentions)["logits"]).all()


def test_fused_and_explicit_attention_agree(model, batch):
    input_ids, mask = batch
    with torch.no_grad():
        fused = model(input_ids, mask, output_hidden_states=True)
        explicit = model(input_ids, mask, output_hidden_states=True, output_attentions=True)
    torch.testing.assert_close(explicit["logits"], fused["logits"], atol=1e-5, rtol=0)
    for a, b in zip(explicit["hidden_states"], fused["hidden_states"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_attention_rows_sum_to_one_over_real_tokens(model, batch):
    input_ids, mask = batch
    with torch.no_grad():
        attentions = model(input_ids, mask, output_attentions=True)["attentions"]
    assert len(attentions) == model.config.num_layers
    real_keys = mask.bool()[:, None, None, :]
    for weights in attentions:
        assert weights.shape == (3, 2, input_ids.shape[1], input_ids.shape[1])
        assert (weights.masked_select(~real_keys.expand_as(weights)) == 0).all()
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))


def test_hidden_states_follow_the_esm_convention(model, batch):
    input_ids, mask = batch
    with torch.no_grad():
        out = model(input_ids, mask, output_hidden_states=True)
    hidden = out["hidden_states"]
    assert len(hidden) == model.config.num_layers + 1
    torch.testing.assert_close(hidden[0], model.embed_tokens(input_ids))
    # The last entry is after the final LayerNorm: the head reads it directly.
    torch.testing.assert_close(model.lm_head(hidden[-1]), out["logits"])
    assert "attentions" not in out


def test_inputs_embeds_replace_the_lookup(model, batch):
    input_ids, mask = batch
    with torch.no_grad():
        expected = model(input_ids)["logits"]
        embeds = model.embed_tokens(input_ids)
        torch.testing.assert_close(model(inputs_embeds=embeds, attention_mask=mask)["logits"], expected)
        torch.testing.assert_close(model(input_ids, inputs_embeds=embeds)["logits"], expected)
    with pytest.raises(ValueError, match="attention_mask"):
        model(inputs_embeds=embeds)


# -- parameters --------------------------------------------------------------------------------


def test_gradients_reach_every_parameter(tokenizer, batch):
    model = tiny_student(tokenizer).train()
    input_ids, mask = batch
    logits = model(input_ids, mask)["logits"]
    labels = torch.randint(0, len(tokenizer), input_ids.shape, generator=torch.Generator().manual_seed(1))
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_training_after_inference_mode(tokenizer):
    model = tiny_student(tokenizer)
    with torch.inference_mode():
        model.eval()(tokenizer.encode("A" * 30)[None])  # builds the rotary table in inference mode
    model.train()(tokenizer.encode("ACDE")[None])["logits"].sum().backward()
    assert model.embed_tokens.weight.grad is not None


def test_tied_embeddings_share_one_tensor(tokenizer):
    tied = tiny_student(tokenizer)
    assert tied.lm_head.decoder.weight.data_ptr() == tied.embed_tokens.weight.data_ptr()
    untied = tiny_student(tokenizer, tie_embeddings=False)
    assert untied.lm_head.decoder.weight.data_ptr() != untied.embed_tokens.weight.data_ptr()
    assert untied.num_parameters() - tied.num_parameters() == 30 * 32


def test_default_parameter_count_by_hand(tokenizer):
    model = Student(StudentConfig.from_tokenizer(tokenizer))
    V, D, F, L = 30, 384, 1536, 4
    embedding = V * D  # 11,520 (shared with the decoder)
    block = (
        2 * D  # attention LayerNorm
        + D * 3 * D
        + 3 * D  # q, k, v projection
        + D * D
        + D  # output projection
        + 2 * D  # feed-forward LayerNorm
        + D * F
        + F
        + F * D
        + D
    )  # feed-forward: 1,774,464 per block
    final_norm = 2 * D
    head = D * D + D + 2 * D + V  # dense, LayerNorm, output bias
    assert embedding + L * block + final_norm + head == 7_258_782
    assert model.num_parameters() == 7_258_782
    assert model.num_parameters(exclude_embeddings=True) == 7_258_782 - 11_520
    assert model.summary() == ("Student: 4 layers, d_model 384, 6 heads, d_ff 1536, vocab 30, 7.3M parameters")


@pytest.mark.parametrize("length", [1, 512, 4096])
def test_runs_at_any_length(tokenizer, length):
    model = tiny_student(tokenizer, num_layers=1).eval()
    input_ids = torch.randint(5, len(tokenizer), (1, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids)["logits"]
    assert logits.shape == (1, length, len(tokenizer))
    assert torch.isfinite(logits).all()


# -- config validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sizes, message",
    [
        ({"d_model": 30, "num_heads": 4}, "d_model 30 is not divisible by num_heads 4"),
        ({"d_model": 30, "num_heads": 2}, "head dimension d_model/num_heads = 15 must be even"),
        ({"num_layers": -1}, "num_layers must be a positive integer, got -1"),
        ({"d_model": 0}, "d_model must be a positive integer, got 0"),
        ({"d_ff": -8}, "d_ff must be a positive integer, got -8"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
    ],
)
def test_config_rejects_bad_sizes(tokenizer, sizes, message):
    with pytest.raises(ValueError, match=message):
        StudentConfig.from_tokenizer(tokenizer, **sizes)


def test_config_rejects_ids_outside_the_vocab():
    with pytest.raises(ValueError, match=r"pad_token_id 30 is outside the vocabulary \(size 30\)"):
        StudentConfig(vocab=PROTBERT_VOCAB, pad_token_id=30, mask_token_id=4, cls_token_id=2, eos_token_id=3)


def test_config_defaults(tokenizer):
    config = StudentConfig.from_tokenizer(tokenizer, d_model=64, num_heads=4)
    assert (config.d_ff, config.vocab_size, config.pad_token_id, config.mask_token_id) == (256, 30, 0, 4)


# -- checkpoints -------------------------------------------------------------------------------


def test_save_and_load_give_identical_logits(model, batch, tokenizer, tmp_path):
    directory = tmp_path / "best_model"
    save_student(model, directory, metadata={"step": 120, "val_loss": 1.25, "teacher": "tiny"})
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.pt"]  # no temp files
    written = json.loads((directory / "config.json").read_text())
    assert written["num_parameters"] == model.num_parameters()
    assert written["config"]["d_model"] == 32 and written["metadata"]["step"] == 120

    input_ids, mask = batch
    with torch.no_grad():
        expected = model(input_ids, mask)["logits"]
    for path in (directory, directory / "model.pt"):
        loaded = load_student(path)
        assert not loaded.model.training
        assert loaded.metadata == {"step": 120, "val_loss": 1.25, "teacher": "tiny"}
        assert loaded.tokenizer.vocab == PROTBERT_VOCAB
        assert loaded.tokenizer.vocab_hash == tokenizer.vocab_hash
        with torch.no_grad():
            assert torch.equal(loaded.model(input_ids, mask)["logits"], expected)
        head = loaded.model.lm_head.decoder.weight
        assert head.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_save_rejects_metadata_that_is_not_json(model, tmp_path):
    with pytest.raises(ValueError, match="JSON"):
        save_student(model, tmp_path, metadata={"when": object()})


def _reject(path, match):
    with pytest.raises(CheckpointError, match=match) as caught:
        load_student(path)
    assert str(path) in str(caught.value)


def test_missing_path_is_rejected(tmp_path):
    _reject(tmp_path / "nowhere" / "model.pt", "no such checkpoint")
    _reject(tmp_path, "no such checkpoint")  # a folder without model.pt


def test_truncated_checkpoint_is_rejected(model, tmp_path):
    path = save_student(model, tmp_path / "ckpt")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _reject(path, "truncated")
    legacy = tmp_path / "legacy.pt"  # the pre-zip format fails differently when cut short
    torch.save({"w": torch.ones(1000)}, legacy, _use_new_zipfile_serialization=False)
    whole = legacy.read_bytes()
    for size in (100, len(whole) // 2):
        legacy.write_bytes(whole[:size])
        _reject(legacy, "truncated")


def test_foreign_files_are_rejected(model, tmp_path):
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    _reject(tmp_path / "pytorch_model.bin", "not a PepEmb student checkpoint")
    torch.save({"epoch": 3, "weights": [1.0, 2.0]}, tmp_path / "plain.pt")
    _reject(tmp_path / "plain.pt", "not a PepEmb student checkpoint")
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    _reject(tmp_path / "notes.txt", "not a torch file")


def test_unknown_format_version_is_rejected(model, tmp_path):
    path = save_student(model, tmp_path / "ckpt")
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = 99
    torch.save(payload, path)
    _reject(path, "format_version 99 is not supported")


class _Payload:
    """Unpickling this creates a file: the kind of code a hostile checkpoint would carry."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return open, (self.target, "w")


def test_pickle_carrying_code_is_refused_without_running(tmp_path):
    control, target = tmp_path / "control-ran", tmp_path / "payload-ran"
    torch.save({"format": "pepemb-student", "x": _Payload(control)}, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert control.exists()  # the payload is live: unrestricted unpickling runs it

    torch.save({"format": "pepemb-student", "format_version": 1, "x": _Payload(target)}, tmp_path / "evil.pt")
    _reject(tmp_path / "evil.pt", "refused to load: unpickling it would call io.open")
    assert not target.exists()


def test_checkpoint_with_mismatched_weights_is_rejected(model, tmp_path):
    path = save_student(model, tmp_path / "ckpt")
    payload = torch.load(path, weights_only=True)
    del payload["state_dict"]["final_norm.weight"]
    torch.save(payload, path)
    _reject(path, "damaged student checkpoint .*final_norm.weight")


def test_read_safetensors_matches_the_safetensors_package(tmp_path):
    # architecture.py parses the format itself (torch only); check it against the reference writer
    from safetensors.torch import save_file

    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.randn(2).half(), "empty": torch.zeros(0)}
    save_file(tensors, tmp_path / "t.safetensors")
    read = read_safetensors(tmp_path / "t.safetensors")
    assert read.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert read[name].dtype == tensor.dtype and torch.equal(read[name], tensor), name


def test_damaged_exported_folder_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    _reject(tmp_path, "unreadable exported student")


def test_attention_dropout_is_set_apart_from_dropout(tokenizer):
    ids = torch.tensor([[2, 5, 6, 7, 8, 9, 10, 3]])

    def two_training_passes(**dropouts):
        student = tiny_student(tokenizer, **dropouts).train()
        return [student(ids)["logits"] for _ in range(2)]

    # only the attention weights dropped: two passes in training mode differ; with it at 0, they match
    a, b = two_training_passes(dropout=0.0, attention_dropout=0.5)
    assert not torch.allclose(a, b)
    a, b = two_training_passes(dropout=0.0, attention_dropout=0.0)
    assert torch.equal(a, b)
    default = tiny_student(tokenizer, dropout=0.3)  # None: the attention weights take --dropout
    assert default.blocks[0].attn.dropout == 0.3 and tiny_student(tokenizer).config.attention_dropout is None
    kept = tiny_student(tokenizer, dropout=0.3, attention_dropout=0.0)
    assert kept.blocks[0].attn.dropout == 0.0 and kept.blocks[0].ffn[3].p == 0.3
