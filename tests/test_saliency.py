"""saliency.py: Integrated Gradients that add up, weight-randomisation sanity checks and the
deletion test, on tiny students and on a model built so that one residue alone decides."""

import json

import numpy as np
import pytest
import torch
from torch import nn

import visualization as vis
from architecture import ResidueTokenizer, Student, StudentConfig, save_student
from pepemb import cli, saliency
from pepemb.teacher import PROTBERT_VOCAB

SEQUENCE = "EVQLVESGGGLVQPGGSLRLSCAASGFTFS"


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    """A 2-layer student whose weights are far from initialisation, so its outputs move."""
    tokenizer = ResidueTokenizer.from_vocab(PROTBERT_VOCAB)
    torch.manual_seed(0)
    model = Student(StudentConfig.from_tokenizer(tokenizer, d_model=32, num_heads=2, num_layers=2, dropout=0.0))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    directory = tmp_path_factory.mktemp("student")
    save_student(model, directory)
    return directory


@pytest.fixture(scope="module")
def student(student_dir):
    return vis.load_student_explainer(str(student_dir), torch.device("cpu"))


def test_adaptive_steps_make_the_attributions_add_up(student):
    targets = [3, 9, 15, 22, 28]
    result = saliency.integrated_gradients(student, SEQUENCE, targets, progress=False)
    assert result.converged.all()
    ok = (result.relative_deltas <= 0.05) | (np.abs(result.deltas) <= 1e-3)
    assert ok.all() and (result.n_steps >= saliency.FIRST_STEPS).all() and (result.n_steps <= saliency.MAX_STEPS).all()
    # completeness by hand: the attributions sum to log p(x) - log p(baseline), up to the delta
    true_ids = student.tokenizer.encode(SEQUENCE)[None]
    baseline = true_ids.clone()
    baseline[0, 1:-1] = student.tokenizer.mask_id
    for row, target in enumerate(targets):
        masked = true_ids.clone()
        masked[0, target] = student.tokenizer.mask_id
        with torch.no_grad():
            change = (
                student.true_residue_log_probs(masked, true_ids)[0, target]
                - student.true_residue_log_probs(baseline, true_ids)[0, target]
            ).item()
        assert result.totals[row] - change == pytest.approx(result.deltas[row], abs=1e-4)


def test_too_few_fixed_steps_are_reported(student, capsys):
    rough = saliency.integrated_gradients(student, SEQUENCE, [3, 9, 15, 22, 28], n_steps=2, progress=False)
    assert not rough.converged.all() and (rough.n_steps == 2).all()  # a fixed --n_steps is kept
    vis.report_convergence("student", rough)
    warning = capsys.readouterr().out.splitlines()[-1]
    assert warning.startswith("warning: student: completeness is off by more than 5%")
    assert all(str(t) in warning for t in saliency.unconverged_targets(rough))


def test_randomisation_changes_the_copy_and_leaves_the_model_untouched(student):
    model = student.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups = saliency.layer_groups(model)
    assert [name for name, _ in groups] == ["head", "block 2", "block 1", "embeddings"]
    top = saliency.randomised(model, 2, seed=0)  # the head and the top block
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # the trained model is untouched
    changed = {k for k, v in top.state_dict().items() if not torch.equal(v, before[k])}
    assert {"lm_head.dense.weight", "blocks.1.attn.qkv.weight", "final_norm.bias"} <= changed
    assert not [k for k in changed if k.startswith("blocks.0.") or k == "embed_tokens.weight"]
    assert "lm_head.decoder.weight" not in changed  # tied to the embeddings, randomised with them
    full = saliency.randomised(model, len(groups), seed=0)
    assert not torch.equal(full.embed_tokens.weight, before["embed_tokens.weight"])
    assert full.lm_head.decoder.weight is full.embed_tokens.weight


def test_sanity_check_reports_every_cascade_step(student):
    trained = saliency.integrated_gradients(student, SEQUENCE, [5, 12, 20], progress=False)
    check = saliency.sanity_check(student, SEQUENCE, [5, 12, 20], trained)
    assert [c["down_to"] for c in check["cascade"]] == ["head", "block 2", "block 1", "embeddings"]
    assert all(c["spearman"] is None or -1 <= c["spearman"] <= 1 for c in check["cascade"])
    assert check["fully_random_spearman"] == check["cascade"][-1]["spearman"]
    assert check["flagged"] == (check["fully_random_spearman"] is not None and check["fully_random_spearman"] >= 0.5)


class OneResidueDecides(nn.Module):
    """Every position's logits are 10 x the one-hot of the token at `position`: the residue there
    alone decides every prediction."""

    def __init__(self, vocab_size: int, position: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, vocab_size)
        self.out = nn.Linear(vocab_size, vocab_size, bias=False)
        with torch.no_grad():
            self.embed.weight.copy_(torch.eye(vocab_size))
            self.out.weight.copy_(10 * torch.eye(vocab_size))
        self.position = position

    def forward(self, input_ids=None, **_):
        decided = self.out(self.embed(input_ids)[:, self.position])
        return {"logits": decided[:, None, :].expand(-1, input_ids.shape[1], -1)}


def test_deleting_the_deciding_residue_drops_the_prediction_far_more_than_a_random_one():
    tokenizer = ResidueTokenizer.from_vocab(PROTBERT_VOCAB)
    sequence, deciding = "A" * 30, 12  # token 12 is residue 12 (1-based)
    model = OneResidueDecides(len(tokenizer), deciding).requires_grad_(False)
    explainer = vis.Explainer(
        "planted", "", model, tokenizer, model.embed, num_layers=1, num_heads=1, width=len(tokenizer), max_tokens=10**6
    )
    targets = [3, 20, 27]
    result = saliency.integrated_gradients(explainer, sequence, targets, progress=False)
    assert result.converged.all()
    assert (result.attributions.argmax(1) == deciding - 1).all()  # the saliency finds it
    faithful = saliency.faithfulness(explainer, sequence, result, seed=0)
    assert faithful["sizes"] == [1, 2, 5, 6, 10]
    top1, random1 = faithful["curves"]["saliency"][0], faithful["curves"]["random"][0]
    assert top1 > 9 and top1 > 5 * random1  # ~10 nats against a 1-in-29 chance of hitting it
    assert faithful["aopc"]["saliency"] > faithful["aopc"]["random"]


def test_nearest_residues_and_deletion_sizes_by_hand():
    assert saliency.nearest_residues(3, 6) == [1, 3, 0, 4, 5]  # target residue index 2
    assert saliency.deletion_sizes(30) == [1, 2, 5, 6, 10]
    assert saliency.deletion_sizes(4) == [1, 2]


def test_the_command_line_writes_the_checks(student_dir, tmp_path):
    out = tmp_path / "vis"
    with pytest.raises(SystemExit) as exit_info:
        cli.run(
            vis.main,
            [
                "--model_path",
                str(student_dir),
                "--sequence",
                SEQUENCE,
                "--output_dir",
                str(out),
                "--positions",
                "4,10,18",
                "--sanity_check",
                "--faithfulness",
                "--device",
                "cpu",
            ],
        )
    assert exit_info.value.code == 0
    model = json.loads((out / "summary.json").read_text())["sequences"][0]["models"]["student"]
    assert model["integrated_gradients"]["targets"] == [4, 10, 18] and all(model["integrated_gradients"]["converged"])
    assert len(model["sanity_check"]["cascade"]) == 4 and set(model["faithfulness"]["aopc"]) == {
        "saliency",
        "random",
        "nearest",
    }
    for name in ("saliency_sanity.png", "saliency_faithfulness.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
