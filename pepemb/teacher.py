"""The teacher: any HuggingFace masked protein LM, frozen, behind one small interface.

`load_teacher(name_or_path)` takes a Hub id (Rostlab/prot_bert, facebook/esm2_t6_8M_UR50D, ...),
a folder written by `save_pretrained`, or "antiberty": the offline teacher whose weights ship in
the PyPI wheel antiberty==0.1.3 and are converted once into a standard BertForMaskedLM folder.
The student's vocabulary is the teacher's (`Teacher.tokenizer`), so their ids line up exactly.

`save_random_teacher` writes a randomly initialised teacher with ProtBert's or ESM-2's exact
vocabulary, loadable through the same `from_pretrained` path: tests and benchmarks use it
on machines that cannot reach the Hub.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import requests
import torch
from huggingface_hub import try_to_load_from_cache
from torch import nn
from transformers import (
    AutoModelForMaskedLM,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    BertTokenizer,
    EsmConfig,
    EsmForMaskedLM,
    EsmTokenizer,
)

from architecture import STANDARD_RESIDUES, ResidueTokenizer
from pepemb.cli import UserError
from pepemb.files import follow_umask

ANTIBERTY = "antiberty"
ANTIBERTY_VERSION = "0.1.3"
# Heads of AntiBERTy's multi-task checkpoint that a plain BertForMaskedLM does not have.
_ANTIBERTY_EXTRA_KEYS = ("bert.pooler.", "cls.species.", "cls.chain.", "cls.graft.", "bert.embeddings.position_ids")

PROTBERT_VOCAB = ("[PAD] [UNK] [CLS] [SEP] [MASK] L A G V E S I K R D T P N Q F Y M H C W X U B Z O").split()
ESM2_VOCAB = ("<cls> <pad> <eos> <unk> L A G V S E R T I D P K Q N F Y M H W C X B U Z O . - <null_1> <mask>").split()
PROTBERT_SHAPE = dict(num_layers=30, hidden_size=1024, num_heads=16, intermediate_size=4096)
ESM2_8M_SHAPE = dict(num_layers=6, hidden_size=320, num_heads=20, intermediate_size=1280)

# For tests of the bitsandbytes path only: PEPEMB_CPU_BNB=1 makes use_8bit on CPU load the teacher
# through bitsandbytes, as on CUDA (its Linear8bitLt layers run on CPU in 0.50.2), instead of
# torch's dynamic int8 layers.
CPU_BNB = "PEPEMB_CPU_BNB"

_OFFLINE_HINT = (
    "on a machine without internet pass a local folder written by save_pretrained: --teacher_model /path/to/folder"
)


class Teacher:
    """A frozen masked LM and its tokenizer. Calling it returns float32 logits [B, L, V] and,
    when asked, the last layer's hidden states [B, L, H], on the teacher's device."""

    def __init__(
        self,
        model,
        hf_tokenizer,
        tokenizer: ResidueTokenizer,
        name: str,
        backend: str,
        device: torch.device,
        num_parameters: int,
    ):
        self.model = model
        self.hf_tokenizer = hf_tokenizer
        self.tokenizer = tokenizer
        self.name = name
        self.backend = backend
        self.device = device
        self.num_parameters = num_parameters

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    @property
    def max_positions(self) -> int:
        """Longest input in tokens (cls and eos included) the model can take.

        Learned absolute position embeddings cap it; rotary ones (ESM-2) do not.
        """
        config = self.model.config
        if getattr(config, "position_embedding_type", "absolute") != "absolute":
            return sys.maxsize
        # fairseq-style ESM (ESM-1b) numbers positions from padding_idx + 1.
        offset = config.pad_token_id + 1 if config.model_type == "esm" else 0
        return config.max_position_embeddings - offset

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, output_hidden_states: bool = False
    ) -> dict:
        with torch.inference_mode():
            out = self.model(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                output_hidden_states=output_hidden_states,
            )
        # Copies made outside inference mode are ordinary tensors: a distillation loss may save
        # them for backward, which inference tensors forbid.
        result = {"logits": out.logits.to(torch.float32, copy=True)}
        if output_hidden_states:
            result["hidden_states"] = out.hidden_states[-1].to(torch.float32, copy=True)
        return result

    def __repr__(self) -> str:
        return f"Teacher({self.name!r}, {self.num_parameters / 1e6:.1f}M parameters, {self.backend}, {self.device})"


def load_teacher(
    name_or_path: str,
    device: str | torch.device = "cpu",
    use_8bit: bool = False,
    half: bool = False,
    trust_remote_code: bool = False,
) -> Teacher:
    """A frozen, eval-mode masked LM and its tokenizer: Hub id, local folder, or "antiberty".

    use_8bit: int8 weights; bitsandbytes on CUDA, torch's dynamic int8 Linear layers on CPU
    (bitsandbytes there too with PEPEMB_CPU_BNB=1, for testing).
    half: fp16 weights on CUDA (ignored, with a warning, on CPU where fp16 is slow).
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device} requested but CUDA is not available; use --device cpu")
    if name_or_path == ANTIBERTY:
        source = str(antiberty_folder())
    else:
        source = os.path.expanduser(name_or_path)
    model_kwargs, backend = _precision(device, use_8bit, half)
    hf_tokenizer, model = _from_pretrained(source, model_kwargs, trust_remote_code)

    model.eval().requires_grad_(False)
    num_parameters = sum(p.numel() for p in model.parameters())
    if "quantization_config" not in model_kwargs:  # bitsandbytes already placed it via device_map
        model.to(device)
    tokenizer = _residue_tokenizer(name_or_path, hf_tokenizer, model.config.vocab_size)
    if use_8bit and device.type == "cpu" and "quantization_config" not in model_kwargs:
        model = _quantize_linear_int8(model)
    return Teacher(model, hf_tokenizer, tokenizer, name_or_path, backend, device, num_parameters)


def _precision(device: torch.device, use_8bit: bool, half: bool) -> tuple[dict, str]:
    """from_pretrained keyword arguments for the requested precision, and its description."""
    if use_8bit and (device.type == "cuda" or (device.type == "cpu" and os.environ.get(CPU_BNB) == "1")):
        return _bitsandbytes(device)
    if use_8bit and device.type == "cpu":
        return {"dtype": torch.float32}, "int8 dynamic (torch, CPU)"
    if use_8bit:
        raise UserError(f"--use_8bit works on cuda (bitsandbytes) or cpu (torch int8), not {device}")
    if half and device.type == "cpu":
        warnings.warn("--half ignored on CPU (fp16 matrix products are slow there); using fp32", stacklevel=3)
    elif half:
        return {"dtype": torch.float16}, "fp16"
    # Explicit: transformers 5 otherwise keeps whatever dtype the checkpoint was stored in.
    return {"dtype": torch.float32}, "fp32"


def _bitsandbytes(device: torch.device) -> tuple[dict, str]:
    """from_pretrained keyword arguments for bitsandbytes' int8 layers (Linear8bitLt) on `device`,
    the rest of the model in fp16, and their description."""
    where = device.type.upper()
    missing = [p for p in ("bitsandbytes", "accelerate") if importlib.util.find_spec(p) is None]
    if missing:
        raise UserError(f"--use_8bit on {where} needs {' and '.join(missing)}: pip install {' '.join(missing)}")
    from transformers import BitsAndBytesConfig

    if device.type == "cuda":
        place = device.index if device.index is not None else torch.cuda.current_device()
    else:
        place = "cpu"
    return (
        {
            "quantization_config": BitsAndBytesConfig(load_in_8bit=True),
            "device_map": {"": place},
            "dtype": torch.float16,
        },
        f"int8 bitsandbytes ({where})",
    )


def _from_pretrained(source: str, model_kwargs: dict, trust_remote_code: bool):
    """(hf_tokenizer, model) from a local folder, the HF cache, or the Hub, in that order.

    Cache first and a quick reachability probe before going online, so an offline machine fails
    in seconds rather than after from_pretrained's minute of retries.
    """
    # Only when asked: it runs code downloaded with the model.
    remote_code = {"trust_remote_code": True} if trust_remote_code else {}

    def load(**extra):
        return (
            AutoTokenizer.from_pretrained(source, **remote_code, **extra),
            AutoModelForMaskedLM.from_pretrained(source, **model_kwargs, **remote_code, **extra),
        )

    path = Path(source)
    if path.exists() or _looks_like_path(source):
        if not path.is_dir():
            raise UserError(
                f"teacher folder {source} does not exist (or is not a folder); pass a "
                "folder written by save_pretrained, or a HuggingFace Hub id"
            )
        try:
            return load()
        except OSError as err:
            raise UserError(f"could not load teacher from {source}: {_first_line(err)}") from err
    try:
        return load(local_files_only=True)
    except OSError:
        pass
    if _hub_offline():
        raise UserError(
            f"teacher {source!r} is not in the HuggingFace cache and HF_HUB_OFFLINE is set; {_OFFLINE_HINT}"
        )
    if not hub_reachable():
        raise UserError(
            f"teacher {source!r} is not in the HuggingFace cache and the Hub "
            f"({_hub_endpoint()}) cannot be reached; {_OFFLINE_HINT}"
        )
    try:
        return load()
    except OSError as err:
        raise UserError(f"could not load teacher {source!r} from the HuggingFace Hub: {_first_line(err)}") from err


def teacher_unavailable(name_or_path: str) -> str | None:
    """Why load_teacher(name_or_path) would fail for want of files or network, else None.

    Cheap (no weights read, at most one short request to the Hub), so a pipeline can pick its
    offline preset in seconds instead of waiting out from_pretrained's retries.
    """
    if name_or_path == ANTIBERTY:
        try:
            _antiberty_package()
        except UserError as err:
            return str(err)
        return None
    path = Path(os.path.expanduser(name_or_path))
    if path.exists() or _looks_like_path(name_or_path):
        return None if path.is_dir() else f"teacher folder {name_or_path} does not exist"
    if isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
        return None
    if _hub_offline():
        return f"{name_or_path} is not in the HuggingFace cache and HF_HUB_OFFLINE is set"
    if not hub_reachable():
        return f"{name_or_path} is not in the HuggingFace cache and the Hub ({_hub_endpoint()}) cannot be reached"
    return None


def _looks_like_path(name: str) -> bool:
    """Hub ids are 'name' or 'namespace/name'; anything else with separators is a path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _hub_offline() -> bool:
    return any(
        os.environ.get(var, "").upper() in {"1", "ON", "YES", "TRUE"}
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the HuggingFace Hub (HF_ENDPOINT, default https://huggingface.co) answers at all."""
    try:
        requests.head(_hub_endpoint(), timeout=timeout, allow_redirects=False)
    except requests.RequestException:
        return False
    return True


def _residue_tokenizer(name: str, hf_tokenizer, model_vocab_size: int) -> ResidueTokenizer:
    """The student's tokenizer, after checking that the teacher's really is residue-level."""
    size = len(hf_tokenizer)
    if size > model_vocab_size:
        raise UserError(
            f"teacher {name}: its tokenizer has {size} tokens but the model's "
            f"vocabulary only {model_vocab_size}; tokenizer and weights do not match"
        )
    try:
        tokenizer = ResidueTokenizer.from_hf(hf_tokenizer)
    except ValueError as err:
        raise UserError(f"teacher {name}: not a residue-level protein tokenizer ({err})") from err
    distinct = len(set(tokenizer.residue_ids))
    if distinct != len(STANDARD_RESIDUES):
        raise UserError(
            f"teacher {name}: its {size}-token tokenizer gives the 20 amino acids {distinct} "
            "distinct ids, so it is not a residue-level protein tokenizer (under transformers 5, "
            "BertTokenizer(vocab_file=...) silently builds a 5-token one: build it with "
            "BertTokenizer(vocab=path, do_lower_case=False) and save_pretrained it)"
        )
    # ProtBert-style tokenizers read space-separated residues, ESM-style ones the bare string.
    probe = tokenizer.encode(STANDARD_RESIDUES).tolist()
    if probe not in (
        hf_tokenizer(" ".join(STANDARD_RESIDUES))["input_ids"],
        hf_tokenizer(STANDARD_RESIDUES)["input_ids"],
    ):
        raise UserError(
            f"teacher {name}: its tokenizer does not encode a protein as "
            "[cls] one-id-per-residue [eos]; this tokenizer is not supported"
        )
    return tokenizer


def _quantize_linear_int8(model: nn.Module) -> nn.Module:
    """int8 weights, activations quantized on the fly: 1.5x (AntiBERTy) to 2.9x (ProtBert shape)
    faster than fp32 on CPU here (bench/bench_distill.py)."""
    with warnings.catch_warnings():
        # torch flags eager-mode quantization as deprecated in favour of torchao (not a
        # dependency here); it still works and is the fastest CPU int8 path available.
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)


# --------------------------------------------------------------------------------------------
# AntiBERTy: the offline teacher
# --------------------------------------------------------------------------------------------


def antiberty_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """A BertForMaskedLM folder converted from the antiberty==0.1.3 wheel, built once and cached.

    cache_dir defaults to $PEPEMB_CACHE, else ~/.cache/pepemb; the folder inside is
    antiberty-0.1.3 (about 100 MB). Written to a temporary folder and renamed, so a folder that
    exists is complete.
    """
    root = Path(cache_dir or os.environ.get("PEPEMB_CACHE") or "~/.cache/pepemb").expanduser()
    folder = root / f"antiberty-{ANTIBERTY_VERSION}"
    if folder.is_dir():
        return folder
    model, tokenizer = _convert_antiberty(_antiberty_package())
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=root))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        follow_umask([staging, *staging.rglob("*")])  # mkdtemp's 0700, save_pretrained's 0600 weights
        try:
            staging.rename(folder)
        except OSError:
            if not folder.is_dir():  # otherwise a concurrent process finished first: use its copy
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _antiberty_package() -> Path:
    """The installed package's folder, found without importing it (it breaks on transformers 5)."""
    spec = importlib.util.find_spec(ANTIBERTY)
    install = f"pip install antiberty=={ANTIBERTY_VERSION}"
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the offline teacher 'antiberty' needs its PyPI package: {install}")
    package = Path(next(iter(spec.submodule_search_locations)))
    if not (package / "trained_models" / "AntiBERTy_md_smooth" / "pytorch_model.bin").is_file():
        raise UserError(
            f"the installed antiberty package ({package}) has no bundled weights; "
            f"only {ANTIBERTY_VERSION} ships them: {install}"
        )
    return package


def _convert_antiberty(package: Path) -> tuple[BertForMaskedLM, BertTokenizer]:
    checkpoint = package / "trained_models" / "AntiBERTy_md_smooth"
    config = BertConfig.from_json_file(checkpoint / "config.json")
    config.architectures = ["BertForMaskedLM"]
    state = torch.load(checkpoint / "pytorch_model.bin", map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith(_ANTIBERTY_EXTRA_KEYS)}
    model = BertForMaskedLM(config)
    model.load_state_dict(state, strict=True)
    # vocab=, not vocab_file=: under transformers 5 the latter silently yields 5 tokens.
    tokenizer = BertTokenizer(
        vocab=str(package / "trained_models" / "vocab.txt"),
        do_lower_case=False,
        model_max_length=config.max_position_embeddings,
    )
    return model, tokenizer


# --------------------------------------------------------------------------------------------
# Random teachers with real vocabularies (tests, benchmarks)
# --------------------------------------------------------------------------------------------


def save_random_teacher(
    directory: str | os.PathLike,
    kind: str = "protbert",
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 2,
    intermediate_size: int = 128,
    max_positions: int = 1024,
    initializer_range: float = 0.02,
    seed: int = 0,
) -> Path:
    """Save a randomly initialised masked LM and its tokenizer with save_pretrained.

    kind="protbert": BertForMaskedLM with ProtBert's 30-token vocabulary; kind="esm2":
    EsmForMaskedLM (rotary positions) with ESM-2's 33-token vocabulary. Pass **PROTBERT_SHAPE
    or **ESM2_8M_SHAPE for the real models' sizes. A larger initializer_range than BERT's
    0.02 gives a random teacher peaked, input-dependent predictions: something to distil.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shape = dict(
        num_hidden_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_positions,
        initializer_range=initializer_range,
    )
    if kind == "protbert":
        tokenizer = BertTokenizer(
            vocab={t: i for i, t in enumerate(PROTBERT_VOCAB)}, do_lower_case=False, model_max_length=max_positions
        )
        config = BertConfig(vocab_size=len(PROTBERT_VOCAB), pad_token_id=0, **shape)
        model_class = BertForMaskedLM
    elif kind == "esm2":
        vocab_file = directory / "vocab.txt"
        vocab_file.write_text("\n".join(ESM2_VOCAB) + "\n")
        tokenizer = EsmTokenizer(vocab_file=str(vocab_file), model_max_length=max_positions)
        config = EsmConfig(
            vocab_size=len(ESM2_VOCAB),
            pad_token_id=ESM2_VOCAB.index("<pad>"),
            mask_token_id=ESM2_VOCAB.index("<mask>"),
            position_embedding_type="rotary",
            token_dropout=True,
            emb_layer_norm_before=False,
            layer_norm_eps=1e-5,
            **shape,
        )
        model_class = EsmForMaskedLM
    else:
        raise ValueError(f"kind must be 'protbert' or 'esm2', not {kind!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    follow_umask(directory.glob("*.safetensors"))  # save_pretrained writes the weights 0600
    return directory


def main(argv=None):
    """`python -m pepemb.teacher --check NAME`: exit 0 if the teacher can be loaded here, else say why (exit 1)."""
    import argparse

    parser = argparse.ArgumentParser(description="Check that a teacher can be loaded on this machine.")
    parser.add_argument("--check", required=True, metavar="NAME", help="Hub id, local folder or 'antiberty'")
    reason = teacher_unavailable(parser.parse_args(argv).check)
    if reason:
        print(reason)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
