"""A student as a native transformers ESM-2 model: config.json, model.safetensors, the tokenizer
files and a model card, loadable with AutoModelForMaskedLM / AutoTokenizer / pipeline("fill-mask")
without this repository, no pickle and no remote code. `architecture.load_student` reads it back.

The student's architecture is ESM-2's, so the export is a weight rename (architecture.to_esm_state_dict)
into EsmForMaskedLM with rotary positions, no token dropout and no embedding LayerNorm. The
tokenizer is an EsmTokenizer over the teacher's vocabulary with the teacher's special tokens: a
raw residue string (no spaces) encodes to exactly the student's ids.
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

import safetensors.torch
import torch

from architecture import (
    CHECKPOINT_FORMAT_VERSION,
    EXPORTED_WEIGHTS,
    TEACHER_MAP_WEIGHTS,
    StudentCheckpoint,
    to_esm_state_dict,
)
from pepemb.files import atomic_open

# What a model card says of the teachers this toolkit is used with: licence and citation.
TEACHER_CARDS = {
    "antiberty": (
        "MIT (the antiberty PyPI package)",
        "Ruffolo, Gray & Sulam (2021). Deciphering antibody affinity maturation with language models "
        "and weakly supervised learning. arXiv:2112.07782",
    ),
    "Rostlab/prot_bert": (
        "Academic Free License 3.0 (as stated on its model page)",
        "Elnaggar et al. (2022). ProtTrans: Toward Understanding the Language of Life Through "
        "Self-Supervised Learning. IEEE TPAMI 44(10), 7112-7127",
    ),
}


def esm_config(checkpoint: StudentCheckpoint, command: str | None = None):
    """The EsmConfig of the student, with the student's own config and metadata under "pepemb"."""
    from transformers import EsmConfig

    c, tokenizer = checkpoint.model.config, checkpoint.tokenizer
    return EsmConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.d_model,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        intermediate_size=c.d_ff,
        hidden_act="gelu",
        hidden_dropout_prob=c.dropout,
        attention_probs_dropout_prob=c.dropout if c.attention_dropout is None else c.attention_dropout,
        layer_norm_eps=c.layer_norm_eps,
        max_position_embeddings=1026,  # unused by rotary positions; ESM-2's value
        position_embedding_type="rotary",
        token_dropout=False,
        emb_layer_norm_before=False,
        pad_token_id=c.pad_token_id,
        mask_token_id=c.mask_token_id,
        cls_token_id=c.cls_token_id,
        eos_token_id=c.eos_token_id,
        bos_token_id=c.cls_token_id,
        vocab_list=list(c.vocab),
        tie_word_embeddings=c.tie_embeddings,
        is_folding_model=False,
        architectures=["EsmForMaskedLM"],
        pepemb={
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "config": asdict(c),
            "metadata": checkpoint.metadata,
            "tokenizer": tokenizer.to_dict(),
            "command": command,
        },
    )


def esm_tokenizer(checkpoint: StudentCheckpoint, directory: Path):
    """An EsmTokenizer over the student's vocabulary with the teacher's special-token names."""
    from transformers import EsmTokenizer

    tokenizer = checkpoint.tokenizer
    vocab_file = directory / "vocab.txt"
    vocab_file.write_text("\n".join(tokenizer.vocab) + "\n")
    return EsmTokenizer(
        str(vocab_file),
        unk_token=tokenizer.unk_token,
        cls_token=tokenizer.cls_token,
        pad_token=tokenizer.pad_token,
        mask_token=tokenizer.mask_token,
        eos_token=tokenizer.eos_token,
    )


def export_native(
    checkpoint: StudentCheckpoint, directory: str | Path, eval_report: dict | None = None, command: str | None = None
) -> Path:
    """Write the student to `directory` as a transformers EsmForMaskedLM (see the module docstring);
    `eval_report` (evaluate.py's report.json) puts held-out metrics into the model card."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    command = command or shlex.join(["python", Path(sys.argv[0]).name, *sys.argv[1:]])
    student = checkpoint.model
    config = esm_config(checkpoint, command)
    weights = to_esm_state_dict(student)
    if config.tie_word_embeddings:  # transformers ties the decoder to the word embeddings itself
        del weights["lm_head.decoder.weight"]
    # ESM's contact head is no part of a student: zeros, so that no weight is left uninitialised;
    # the rotary frequencies are the student's (ESM-2's formula with the student's base).
    contacts = config.num_hidden_layers * config.num_attention_heads
    head_dim = student.config.head_dim
    weights |= {
        "esm.contact_head.regression.weight": torch.zeros(1, contacts),
        "esm.contact_head.regression.bias": torch.zeros(1),
        "esm.rotary_embeddings.inv_freq": student.config.rope_base
        ** -(torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim),
    }
    # Written under the canonical names rather than by save_pretrained, whose on-disk names vary
    # between transformers versions; from_pretrained reads these.
    write_safetensors(directory / EXPORTED_WEIGHTS, weights)
    config.save_pretrained(directory)
    esm_tokenizer(checkpoint, directory).save_pretrained(directory)
    if student.teacher_map is not None:
        write_safetensors(directory / TEACHER_MAP_WEIGHTS, student.teacher_map.state_dict())
    (directory / "README.md").write_text(model_card(checkpoint, eval_report, command))
    return directory


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A .safetensors file, atomically, with the mode open() gives (safetensors' own save_file
    renames a private 0600 temporary file into place)."""
    payload = safetensors.torch.save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, {"format": "pt"})
    with atomic_open(path) as handle:
        handle.write(payload)


def model_card(checkpoint: StudentCheckpoint, eval_report: dict | None, command: str) -> str:
    """README.md of an export: what it is, how it was made, how well it does, how to load it."""
    model, metadata = checkpoint.model, checkpoint.metadata
    flags = metadata.get("distill_args", {})
    teacher = metadata.get("teacher", "unknown")
    licence, citation = TEACHER_CARDS.get(teacher, ("see the teacher's own model card", "see the teacher's model card"))
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: fill-mask",
        "tags: [protein, esm, distillation, pepemb]",
        "---",
        "",
        "# PepEmb distilled student (ESM-2 architecture)",
        "",
        f"{model.summary()}, distilled from **{teacher}** by PepEmb distill. A standard "
        "`EsmForMaskedLM`: no custom code.",
        "",
        "## Training",
        "",
        f"- teacher: {teacher}",
        f"- data: {flags.get('data_path', 'unknown')}" + (f" (step {metadata['step']})" if "step" in metadata else ""),
        f"- loss: {flags.get('distill_weight', '?')} x KL at T={flags.get('temperature', '?')} + "
        f"{flags.get('task_weight', '?')} x masked-LM CE"
        + (f" + {flags['embedding_weight']} x teacher-space embedding" if flags.get("embedding_weight") else ""),
        f"- max_seq_len {metadata.get('max_seq_len', flags.get('max_seq_len', '?'))}, batch {flags.get('batch_size', '?')}, "
        f"lr {flags.get('learning_rate', '?')}",
        *([f"- trained with: `{distill_command(flags)}`"] if flags else []),
        f"- exported with: `{command}`",
    ]
    if eval_report:
        lines += ["", "## Held-out evaluation (evaluate.py)", "", *evaluation_lines(eval_report)]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline",
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
        'model = AutoModelForMaskedLM.from_pretrained("path/to/this/folder")',
        'fill = pipeline("fill-mask", model="path/to/this/folder")',
        f'fill("EVQLVESGGGLVQPGG{checkpoint.tokenizer.mask_token}SLRLSCAAS")',
        "```",
        "",
        "Residues are given as one string without spaces. Per-protein embeddings: the mean of the last "
        "hidden state over residues (start and end tokens excluded), as `embed.py` computes them.",
        *(
            []
            if model.teacher_map is None
            else [
                "",
                f"`{TEACHER_MAP_WEIGHTS}` holds a linear map (weight, bias) from that embedding into the "
                f"teacher's {model.config.teacher_hidden_size}-d embedding space (`embed.py --space teacher`).",
            ]
        ),
        "",
        "## Teacher licence and citation",
        "",
        f"- licence: {licence}",
        f"- cite: {citation}",
        "",
    ]
    return "\n".join(lines)


def distill_command(flags: dict) -> str:
    """The distill.py command line of a run, from the arguments its checkpoint records."""
    words = []
    for name, value in flags.items():
        if value is None or value is False:
            continue
        words += [f"--{name}"] if value is True else [f"--{name}", str(value)]
    return shlex.join(["python", "distill.py", *words])


def evaluation_lines(report: dict) -> list[str]:
    m, setup = report["metrics"], report["setup"]
    lines = [
        f"On {setup['sequences']:,} held-out sequences ({setup['data_path']}):",
        "",
        f"- masked accuracy: student {m['student']['masked_acc']:.3f}"
        + (f", teacher {m['teacher']['masked_acc']:.3f}" if m.get("teacher") else ""),
        f"- perplexity: student {m['student']['perplexity']:.2f}",
    ]
    if m.get("agreement") is not None:
        lines.append(f"- top-1 agreement with the teacher: {m['agreement']:.3f}")
    mutations = (report.get("fidelity") or {}).get("mutation_effects")
    if mutations:
        lines.append(f"- zero-shot mutation effects, Spearman with the teacher: {mutations['student']['spearman']:.3f}")
    return lines


def read_eval_report(path: str | Path | None) -> dict | None:
    """evaluate.py's report.json (or the folder holding it), for the model card."""
    if path is None:
        return None
    path = Path(path)
    return json.loads((path / "report.json" if path.is_dir() else path).read_text())
