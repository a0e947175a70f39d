"""PepEmb distill's library: everything the commands at the repository root share.

The student itself is `architecture.py` at the root (torch and the standard library only, so it
can be copied out alone); this package builds everything around it, one job per module.
Data and teacher: `data` (FASTA, splits, `Masking`, batches), `teacher` (any HuggingFace masked
LM or AntiBERTy, frozen), `teacher_cache` and `cache_writer` (its outputs on disk: read, fill),
`teacher_targets` (a batch's teacher outputs, live or cached). Training: `losses`,
`training_step` (one optimizer step), `schedule`, `validation`, `checkpoints`, `distributed`,
`monitoring`, `signals`, `devices`. Using a student: `inference` (ids -> hidden states, long
sequences windowed), `embedding_files`, `teacher_space` (a least-squares map into the teacher's
space), `hf_export` (a native transformers ESM-2 model), `variant_scores` and `variant_outputs`
(zero-shot mutation scores). Measuring it: `heldout` (masked-LM statistics and fidelity probes),
`fidelity` (mutation-effect Spearman, CKA, k-NN overlap as pure functions), `evaluation_report`,
`speed`. Explaining it: `explainer`, `saliency`, `attention`, `saliency_figures`, `figures`.
Command-line plumbing: `options` (argument groups: the only module that sees an argparse
namespace), `cli` (one-line user errors), `progress`, `files`.
"""
