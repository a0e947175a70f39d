"""Teacher loading: local folders, offline failures, the AntiBERTy conversion, int8."""

import importlib.util
import os
import socket
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from transformers import BertForMaskedLM, BertTokenizer

from pepemb.cli import UserError
from pepemb.teacher import (
    _ANTIBERTY_EXTRA_KEYS,
    PROTBERT_VOCAB,
    _antiberty_package,
    antiberty_folder,
    hub_reachable,
    load_teacher,
)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("kind, vocab_size, max_positions", [("protbert", 30, 1024), ("esm2", 33, sys.maxsize)])
def test_tiny_teacher_loads_frozen(
    kind, vocab_size, max_positions, protbert_teacher_dir, esm_teacher_dir, antibody_proteins
):
    folder = protbert_teacher_dir if kind == "protbert" else esm_teacher_dir
    teacher = load_teacher(str(folder))
    assert teacher.backend == "fp32" and teacher.device == torch.device("cpu")
    assert not teacher.model.training
    assert not any(p.requires_grad for p in teacher.model.parameters())
    assert (len(teacher.tokenizer), teacher.vocab_size, teacher.hidden_size) == (vocab_size, vocab_size, 64)
    assert teacher.max_positions == max_positions

    short, long = antibody_proteins[0].sequence[:20], antibody_proteins[1].sequence
    input_ids, attention_mask = teacher.tokenizer.batch_encode([short, long])
    out = teacher(input_ids, attention_mask, output_hidden_states=True)
    assert out["logits"].shape == (2, len(long) + 2, vocab_size)
    assert out["logits"].dtype == torch.float32
    assert out["hidden_states"].shape == (2, len(long) + 2, 64)
    # Padding must not leak into the real positions: the short one alone gives the same outputs.
    alone = teacher(*teacher.tokenizer.batch_encode([short]), output_hidden_states=True)
    assert torch.allclose(alone["logits"][0], out["logits"][0, : len(short) + 2], atol=1e-5)
    assert torch.allclose(alone["hidden_states"][0], out["hidden_states"][0, : len(short) + 2], atol=1e-5)


def test_outputs_can_be_saved_for_backward(protbert_teacher_dir):
    """Inference-mode tensors cannot be saved for backward; the teacher returns ordinary ones."""
    teacher = load_teacher(str(protbert_teacher_dir))
    hidden = teacher(*teacher.tokenizer.batch_encode(["MKVLA"]), output_hidden_states=True)
    weight = torch.ones(teacher.hidden_size, requires_grad=True)
    (hidden["hidden_states"] * weight).sum().backward()
    assert torch.allclose(weight.grad, hidden["hidden_states"].sum((0, 1)))


def test_half_is_ignored_on_cpu(protbert_teacher_dir):
    with pytest.warns(UserWarning, match="--half ignored on CPU"):
        teacher = load_teacher(str(protbert_teacher_dir), half=True)
    assert teacher.backend == "fp32"
    assert next(teacher.model.parameters()).dtype == torch.float32


def test_tokenizer_built_through_the_transformers5_trap_is_refused(tmp_path, protbert_teacher_dir):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((protbert_teacher_dir / name).read_bytes())
    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text("\n".join(PROTBERT_VOCAB) + "\n")
    BertTokenizer(vocab_file=str(vocab_file)).save_pretrained(tmp_path)  # 5 tokens
    with pytest.raises(UserError, match=r"BertTokenizer\(vocab=path, do_lower_case=False\)"):
        load_teacher(str(tmp_path))


@pytest.mark.parametrize("name", ["missing_teacher", "./missing_teacher", "~/missing/teacher/x"])
def test_missing_folder_is_a_user_error(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = str(tmp_path / name) if name == "missing_teacher" else name
    with pytest.raises(UserError, match="does not exist"):
        load_teacher(path)


@pytest.fixture
def unreachable_hub(tmp_path, monkeypatch):
    """Point the Hub at a closed local port, online mode, and an empty HF cache."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)


def test_unreachable_hub_fails_fast_with_advice(unreachable_hub):
    assert not hub_reachable(timeout=3.0)
    start = time.perf_counter()
    # A made-up id, so that a machine with ProtBert in its HF cache behaves the same.
    with pytest.raises(UserError, match="cannot be reached.*--teacher_model /path/to/folder"):
        load_teacher("pepemb-tests/absent-teacher")
    assert time.perf_counter() - start < 15


def test_offline_mode_is_respected(unreachable_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE.*--teacher_model"):
        load_teacher("pepemb-tests/absent-teacher")


# --------------------------------------------------------------------------------------------
# AntiBERTy
# --------------------------------------------------------------------------------------------


def test_antiberty_conversion_is_exact_and_cached(tmp_path):
    folder = antiberty_folder(tmp_path)
    assert folder == tmp_path / "antiberty-0.1.3"
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no staging folder left
    written = (folder / "config.json").stat().st_mtime_ns
    assert antiberty_folder(tmp_path) == folder
    assert (folder / "config.json").stat().st_mtime_ns == written  # reused, not rebuilt

    model, info = BertForMaskedLM.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    config = model.config
    assert (
        config.vocab_size,
        config.hidden_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.intermediate_size,
        config.max_position_embeddings,
    ) == (25, 512, 8, 8, 2048, 512)
    original = torch.load(
        _antiberty_package() / "trained_models" / "AntiBERTy_md_smooth" / "pytorch_model.bin",
        map_location="cpu",
        weights_only=True,
    )
    kept = {k: v for k, v in original.items() if not k.startswith(_ANTIBERTY_EXTRA_KEYS)}
    converted = model.state_dict()
    assert set(kept) == set(converted)
    assert all(torch.equal(kept[k], converted[k]) for k in kept)


def test_missing_antiberty_package_is_a_user_error(tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(importlib.util, "find_spec", lambda name: None)
        with pytest.raises(UserError, match=r"pip install antiberty==0\.1\.3"):
            antiberty_folder(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")
@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_antiberty_cache_and_random_teachers_follow_the_umask(umask, tmp_path, monkeypatch):
    from transformers import BertConfig

    from pepemb import teacher as teacher_module

    def tiny_conversion(package):  # the real one reads the antiberty wheel: 100 MB, same writing
        config = BertConfig(vocab_size=len(PROTBERT_VOCAB), hidden_size=8, num_hidden_layers=1, num_attention_heads=2)
        vocab = {t: i for i, t in enumerate(PROTBERT_VOCAB)}
        return BertForMaskedLM(config), BertTokenizer(vocab=vocab, do_lower_case=False)

    monkeypatch.setattr(teacher_module, "_antiberty_package", lambda: tmp_path)
    monkeypatch.setattr(teacher_module, "_convert_antiberty", tiny_conversion)
    previous = os.umask(umask)
    try:
        cached = antiberty_folder(tmp_path / "cache")
        random_teacher = teacher_module.save_random_teacher(tmp_path / "random", kind="esm2", num_layers=1)
    finally:
        os.umask(previous)
    for folder in (cached, random_teacher):
        modes = {p.name: oct(p.stat().st_mode & 0o777) for p in [folder, *folder.iterdir()]}
        assert "model.safetensors" in modes
        assert modes == {n: oct((0o777 if n == folder.name else 0o666) & ~umask) for n in modes}


@pytest.fixture(scope="module")
def antiberty_fp32():
    return load_teacher("antiberty")


@pytest.fixture(scope="module")
def masked_antibodies(antiberty_fp32, antibody_proteins):
    """100 real V domains with 15% of residues replaced by [MASK] (seed 0)."""
    tokenizer = antiberty_fp32.tokenizer
    sequences = [p.sequence for p in antibody_proteins[:100]]
    input_ids, attention_mask = tokenizer.batch_encode(sequences)
    residues = attention_mask.bool() & (input_ids != tokenizer.cls_id) & (input_ids != tokenizer.eos_id)
    generator = torch.Generator().manual_seed(0)
    masked = residues & (torch.rand(input_ids.shape, generator=generator) < 0.15)
    return SimpleNamespace(
        input_ids=input_ids.masked_fill(masked, tokenizer.mask_id),
        attention_mask=attention_mask,
        masked=masked,
        original_ids=input_ids,
    )


def masked_predictions(teacher, batch, batch_size=25):
    """The teacher's top-1 token at each masked position."""
    logits = torch.cat(
        [
            teacher(batch.input_ids[i : i + batch_size], batch.attention_mask[i : i + batch_size])["logits"]
            for i in range(0, len(batch.input_ids), batch_size)
        ]
    )
    return logits.argmax(-1)[batch.masked]


@pytest.fixture(scope="module")
def fp32_predictions(antiberty_fp32, masked_antibodies):
    return masked_predictions(antiberty_fp32, masked_antibodies)


def test_antiberty_predicts_masked_antibody_residues(antiberty_fp32, masked_antibodies, fp32_predictions):
    assert antiberty_fp32.backend == "fp32"
    assert len(antiberty_fp32.tokenizer) == 25 and antiberty_fp32.max_positions == 512
    original = masked_antibodies.original_ids[masked_antibodies.masked]
    assert len(original) > 1000
    assert (fp32_predictions == original).float().mean() > 0.8  # measured 0.858


def test_antiberty_int8_on_cpu_agrees_with_fp32(antiberty_fp32, masked_antibodies, fp32_predictions):
    int8 = load_teacher("antiberty", use_8bit=True)
    assert int8.backend == "int8 dynamic (torch, CPU)"
    assert int8.num_parameters == antiberty_fp32.num_parameters
    agreement = (masked_predictions(int8, masked_antibodies) == fp32_predictions).float().mean()
    assert agreement >= 0.95  # measured 0.998


# --------------------------------------------------------------------------------------------
# CUDA precisions (skipped on CPU-only machines)
# --------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("use_8bit, half, backend", [(False, True, "fp16"), (True, False, "int8 bitsandbytes (CUDA)")])
def test_cuda_precisions_agree_with_fp32(use_8bit, half, backend, masked_antibodies, fp32_predictions):
    teacher = load_teacher("antiberty", device="cuda", use_8bit=use_8bit, half=half)
    assert teacher.backend == backend
    logits = teacher(masked_antibodies.input_ids, masked_antibodies.attention_mask)["logits"]
    assert logits.dtype == torch.float32 and logits.device.type == "cuda"
    top1 = logits.cpu().argmax(-1)[masked_antibodies.masked]
    assert (top1 == fp32_predictions).float().mean() >= 0.95
