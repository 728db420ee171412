"""What every pflat datamodule serves the same way: the private training split (Poisson-sampled under DP),
the held-out validation/test splits and the optional public split, tokenised with the model's own tokenizer."""
from __future__ import annotations

import copy
from typing import Any, ClassVar, Collection, Dict, Iterator, List, Optional, Tuple, Union

import datasets
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pflat_lightning.bundled import resolve_model
from pflat_lightning.checks import check_count, check_fraction, check_optional_count
from pflat_lightning.privacy.sampling import PoissonDataLoader

#: ``source`` values that read local files given by ``data_files``.
FILE_FORMATS = ("csv", "json", "parquet")
#: Names that sources give their held-out splits, in order of preference.
VALIDATION_SPLITS = ("validation", "valid", "val", "dev", "validation_matched")
TEST_SPLITS = ("test", "test_matched")
#: The held-out splits carved from a training split when the source lacks them: (role, fraction argument), in
#: the order carved; the i-th is carved with seed ``seed + i``, the subsets of :meth:`_carve` use the next seeds.
HELD_OUT = (("test", "test_fraction"), ("validation", "val_fraction"), ("public", "public_fraction"))
#: Seed offsets (added to ``seed``) of the random subsets ``max_train_examples`` and ``max_eval_examples`` keep.
TRAIN_SUBSET_OFFSET, EVAL_SUBSET_OFFSET = len(HELD_OUT), len(HELD_OUT) + 1

# A tokenizer whose ``model_max_length`` is at least this has no real limit (transformers' "very large" sentinel).
_NO_LENGTH_LIMIT = 1_000_000
# Two tokenizers that encode this alike (case, punctuation, digits, special tokens) over the same vocabulary give
# the model the same ids.
_PROBE_TEXT = "Hello, World! It's 2024: naïve CAFÉ."


class PrivateSplitsDataModule(LightningDataModule):
    """Loaders over ``train_dataset``, ``val_dataset``, ``test_dataset`` and ``public_dataset`` (built by the
    subclass' ``setup``), batched by its ``collate_fn``.

    Under ``poisson_sampling`` (set by the DP training module) ``train_dataloader()`` returns a
    :class:`~pflat_lightning.privacy.sampling.PoissonDataLoader` with ``batch_size`` as the expected size;
    under data parallelism it splits one global draw across ranks. Under ``secure_sampling`` (set by the DP
    training module from ``PrivacyConfig.secure_mode``) its draws come from the OS's CSPRNG and ignore
    ``seed``.

    The constructor takes, checks and logs (``save_hyperparameters``, together with the subclass' own
    arguments) the settings every task shares: where the data comes from and how it is split, batched and
    sampled. A subclass passes them on as ``**kwargs``, checks its own arguments and names its built-in
    corpora in :attr:`builtin_corpora`. :meth:`_load` reads the source's splits, :meth:`_chosen_splits` picks
    its training and held-out splits, :meth:`_held_out_sizes` plans the splits to carve.

    Args:
        source: a built-in corpus of the task (:attr:`builtin_corpora`), a file format (``"csv"``, ``"json"``
            for .json/.jsonl, ``"parquet"``) read from ``data_files``, or a hub dataset path (``"glue"``),
            loaded with ``datasets.load_dataset(source, subset)``.
        subset: the hub dataset's configuration (``"sst2"``); only for hub datasets.
        data_files: a file or a ``{split: file}`` mapping; required by the file formats, passed on for
            hub datasets, refused for built-in corpora.
        tokenizer: bundled model name, hub id or folder of the tokenizer; ``None`` (default): the model's
            own, taken at setup from the trainer's LightningModule (its ``tokenizer``). A named tokenizer
            must be the model's (same vocabulary and encoding).
        batch_size: the logical training batch size (the expected size under Poisson sampling).
        eval_batch_size: batch size of the validation, test and public loaders.
        val_fraction: fraction of the training split held out for validation when the source has none (of
            its examples; of its distinct sources for generation).
        test_fraction: likewise for test.
        public_fraction: likewise set aside (removed from training) as public data, served by
            ``public_dataloader()``; ``0`` for none.
        max_train_examples: keep a seeded random subset of this many (private) training examples, after
            the held-out splits are carved (``None``: all); for runs sized to a small machine.
        max_eval_examples: likewise for each of the validation and test splits (for generation: distinct
            sources).
        poisson_sampling: draw Poisson training batches (set by the DP training module).
        seed: seed of the splits, the subsets and the Poisson draws.
        num_workers: dataloader worker processes.
        cache_dir: ``datasets`` cache folder (``None``: its default).

    Raises:
        ValueError: for a bad argument: an unknown or empty ``source``, ``subset`` or ``data_files`` where the
            source takes none, a count below its minimum, fractions outside ``[0, 1)`` or summing to 1 or more.

    The tokenizer follows the model: :meth:`_follow_model` (called by the subclass' ``prepare_data`` and
    ``setup``, before anything is tokenised) takes the trainer's LightningModule's own ``tokenizer`` when none
    was named, refuses a named one that is not the model's, and refuses inputs longer than the model's
    position table holds. Subclasses implement ``_use_tokenizer`` and ``_input_length``.
    """

    #: The tokenizer the splits are tokenised with; ``None`` until the model's is taken.
    tokenizer: Optional[PreTrainedTokenizerBase] = None
    #: The tokenizer's name as given (its ``name_or_path`` when taken from the model), for messages.
    tokenizer_name: Optional[str] = None

    train_dataset: Optional[datasets.Dataset] = None
    val_dataset: Optional[datasets.Dataset] = None
    test_dataset: Optional[datasets.Dataset] = None
    public_dataset: Optional[datasets.Dataset] = None
    secure_sampling: bool = False
    #: The names of the task's built-in corpora (values of ``source`` that read no file and no hub dataset).
    builtin_corpora: ClassVar[Collection[str]] = ()
    #: The subclass' arguments left out of ``hparams`` when ``None`` (Lightning refuses to merge a datamodule's
    #: hparams with the model's when a key holds different values in both).
    unlogged_when_none: ClassVar[Tuple[str, ...]] = ()

    def __init__(
        self,
        source: str,
        *,
        subset: Optional[str] = None,
        data_files: Optional[Union[str, Dict[str, str]]] = None,
        tokenizer: Optional[str] = None,
        batch_size: int = 256,
        eval_batch_size: int = 64,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        public_fraction: float = 0.0,
        max_train_examples: Optional[int] = None,
        max_eval_examples: Optional[int] = None,
        poisson_sampling: bool = False,
        seed: int = 42,
        num_workers: int = 0,
        cache_dir: Optional[str] = None,
    ) -> None:
        super().__init__()
        self._check_source(source, subset, data_files)
        check_count("batch_size", batch_size, 1)
        check_count("eval_batch_size", eval_batch_size, 1)
        check_count("num_workers", num_workers, 0)
        check_optional_count("max_train_examples", max_train_examples, 1)
        check_optional_count("max_eval_examples", max_eval_examples, 1)
        fractions = {"val_fraction": val_fraction, "test_fraction": test_fraction, "public_fraction": public_fraction}
        for name, value in fractions.items():
            check_fraction(name, value)
        if sum(fractions.values()) >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction + public_fraction must be < 1 so that training data remains, got "
                f"{val_fraction} + {test_fraction} + {public_fraction} = {sum(fractions.values())}."
            )
        # Lightning collects the arguments of this constructor and of the subclass' that called it.
        self.save_hyperparameters()
        unlogged = [name for name in self.unlogged_when_none if self.hparams.get(name, "") is None]
        if unlogged:
            self.save_hyperparameters(ignore=unlogged)
        self.source, self.subset, self.data_files = source, subset, data_files
        self.tokenizer_name = tokenizer
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_fraction, self.test_fraction, self.public_fraction = val_fraction, test_fraction, public_fraction
        self.max_train_examples, self.max_eval_examples = max_train_examples, max_eval_examples
        self.poisson_sampling = poisson_sampling
        self.seed, self.num_workers, self.cache_dir = seed, num_workers, cache_dir

    @classmethod
    def _sources(cls) -> str:
        """What ``source`` may name, for messages."""
        return (f"a built-in corpus {sorted(cls.builtin_corpora)}, a file format {list(FILE_FORMATS)} or a hub "
                "dataset")

    def _check_source(self, source: str, subset: Optional[str], data_files: Optional[Union[str, Dict[str, str]]]) -> None:
        if not source:
            raise ValueError(f"source must name {self._sources()}, got {source!r}.")
        if source in self.builtin_corpora and (subset is not None or data_files is not None):
            raise ValueError(
                f"source={source!r} is a built-in corpus: it takes no subset or data_files, got subset={subset!r}, "
                f"data_files={data_files!r}."
            )
        if source in FILE_FORMATS:
            if data_files is None:
                raise ValueError(f"source={source!r} reads local files: pass data_files (a file or {{split: file}}).")
            if subset is not None:
                raise ValueError(f"subset={subset!r} is only for hub datasets, not for source={source!r}.")

    def _load_builtin(self) -> datasets.Dataset:
        """The training split of the built-in corpus ``source``: the task's part."""
        raise NotImplementedError(f"{type(self).__name__} must implement _load_builtin().")

    def _load(self) -> Dict[str, datasets.Dataset]:
        """Every split of the source, as ``datasets`` reads it (a built-in corpus: its ``train`` split)."""
        if self.source in self.builtin_corpora:
            return {"train": self._load_builtin()}
        if self.source in FILE_FORMATS:
            try:
                return dict(datasets.load_dataset(self.source, data_files=self.data_files, cache_dir=self.cache_dir))
            except Exception as error:  # the readers raise their own types (pandas, pyarrow) for unreadable files
                raise ValueError(
                    f"data_files={self.data_files!r} could not be read as {self.source}: {error}"
                ) from error
        return dict(
            datasets.load_dataset(self.source, self.subset, data_files=self.data_files, cache_dir=self.cache_dir)
        )

    def _chosen_splits(self, raw: Dict[str, datasets.Dataset]) -> Dict[str, datasets.Dataset]:
        """The ``train`` split of ``raw`` and, where it has them, its ``validation`` and ``test`` splits (under
        the first of their names in :data:`VALIDATION_SPLITS` and :data:`TEST_SPLITS`)."""
        if "train" not in raw:
            raise ValueError(f"source={self.source!r} has no 'train' split; its splits are {sorted(raw)}.")
        chosen = {"train": raw["train"]}
        for role, names in (("validation", VALIDATION_SPLITS), ("test", TEST_SPLITS)):
            name = next((name for name in names if name in raw), None)
            if name is not None:
                chosen[role] = raw[name]
        return chosen

    def _held_out_sizes(self, present: Collection[str], total: int, unit: str) -> Iterator[Tuple[int, str, int]]:
        """(seed offset, role, size) of each held-out split to carve, in :data:`HELD_OUT` order, from a training
        split of ``total`` ``unit`` (``"examples"``): those not in ``present`` and of a fraction above 0.

        Raises:
            ValueError: when a split would leave no training data.
        """
        remaining = total
        for offset, (role, argument) in enumerate(HELD_OUT):
            fraction = getattr(self, argument)
            if role in present or fraction == 0:
                continue
            size = max(1, round(fraction * total))
            if size >= remaining:
                raise ValueError(
                    f"The training split ({total} {unit}) is too small to hold out the {role} split "
                    f"({argument}={fraction}) and keep training data."
                )
            remaining -= size
            yield offset, role, size

    def _check_batch_size(self, train_size: int, described: str) -> None:
        """Refuse a ``batch_size`` larger than the training split of ``train_size`` items (``described``: what
        they are and what was held out)."""
        if self.batch_size > train_size:
            raise ValueError(
                f"batch_size={self.batch_size} is larger than the training split ({train_size} {described}); use "
                f"batch_size <= {train_size}."
            )

    @property
    def num_train_examples(self) -> int:
        """Size of the (private) training split, the ``N`` of the sampling rate ``batch_size / N``."""
        return len(self._require(self.train_dataset, "train_dataset"))

    def _use_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Adopt ``tokenizer`` and check what depends on it (the template, the separator...): the task's part."""
        raise NotImplementedError(f"{type(self).__name__} must implement _use_tokenizer(tokenizer).")

    def _input_length(self, module: Optional[Any] = None) -> Tuple[int, str]:
        """The most tokens the model reads in one sequence (when training, or evaluating ``module``) and the
        arguments that set it (``"max_length=128"``): the task's part."""
        raise NotImplementedError(f"{type(self).__name__} must implement _input_length(module).")

    def _follow_model(self) -> Optional[Any]:
        """Take or check the tokenizer against the trainer's LightningModule and check the input length
        against its position table; returns that module (``None`` without a trainer).

        Raises:
            ValueError: without a tokenizer and without a model that has one; for a tokenizer that is not
                the model's; for inputs longer than the model's position table (plus prefix) holds.
        """
        module = self.trainer.lightning_module if self.trainer is not None else None
        own = getattr(module, "tokenizer", None)
        if self.tokenizer is None:
            if own is None:
                where = "no trainer is attached" if module is None else f"{type(module).__name__} has no `tokenizer`"
                raise ValueError(
                    f"tokenizer=None means the model's own tokenizer, taken at setup from the trainer's "
                    f"LightningModule, but {where}: pass tokenizer= (the backbone's bundled name, hub id or folder, "
                    "e.g. 'bundled-minilm'), or let trainer.fit/validate/test call setup."
                )
            self.tokenizer_name = own.name_or_path
            self._use_tokenizer(prepared_tokenizer(copy.deepcopy(own), own.name_or_path, self._input_length()))
        elif own is not None:
            difference = tokenizer_difference(self.tokenizer, own)
            if difference:
                raise ValueError(
                    f"tokenizer={self.tokenizer_name!r} is not the tokenizer of {type(module).__name__} (its tokenizer "
                    f"is {own.name_or_path!r}): {difference}, so the model would read other tokens than the text's. "
                    "Leave tokenizer=None to tokenise with the model's own tokenizer."
                )
        position_limit = getattr(getattr(module, "model", None), "position_limit", None)
        found = position_limit() if callable(position_limit) else None
        if found is not None:
            limit, reason = found
            length, arguments = self._input_length(module)
            if length > limit:
                raise ValueError(
                    f"{arguments} does not fit {type(module).__name__}'s backbone: {reason}, so an input holds at most "
                    f"{limit} real tokens; use at most {limit} (the position of token {limit + 1} would not exist)."
                )
        return module

    def train_dataloader(self) -> DataLoader:
        train = self._require(self.train_dataset, "train_dataset")
        if self.poisson_sampling:
            replicas, rank = (1, 0) if self.trainer is None else (self.trainer.world_size, self.trainer.global_rank)
            return PoissonDataLoader(
                train,
                expected_batch_size=self.batch_size,
                collate_fn=self.collate_fn,
                seed=self.seed,
                num_replicas=replicas,
                rank=rank,
                secure=self.secure_sampling,
                num_workers=self.num_workers,
            )
        return DataLoader(train, batch_size=self.batch_size, shuffle=True, collate_fn=self.collate_fn,
                          num_workers=self.num_workers)

    def val_dataloader(self) -> Union[DataLoader, List[DataLoader]]:
        """The validation loader; an empty list (no validation) when there is no validation split."""
        return [] if self.val_dataset is None else self._loader(self.val_dataset, self.eval_batch_size)

    def test_dataloader(self) -> Union[DataLoader, List[DataLoader]]:
        """The test loader; an empty list (no test) when there is no test split."""
        return [] if self.test_dataset is None else self._loader(self.test_dataset, self.eval_batch_size)

    def public_dataloader(self, batch_size: Optional[int] = None, shuffle: bool = False) -> DataLoader:
        """The public split in training-format batches of ``batch_size`` (default ``eval_batch_size``);
        ``shuffle=True`` to train on it (a public teacher)."""
        if self.public_dataset is None:
            raise ValueError(
                f"There is no public split: public_fraction={self.public_fraction}; set it in (0, 1) and call setup()."
            )
        return self._loader(self.public_dataset, batch_size or self.eval_batch_size, shuffle)

    def _loader(self, data: datasets.Dataset, batch_size: int, shuffle: bool = False) -> DataLoader:
        return DataLoader(data, batch_size=batch_size, shuffle=shuffle, collate_fn=self.collate_fn,
                          num_workers=self.num_workers)

    @staticmethod
    def _require(data: Optional[datasets.Dataset], name: str) -> datasets.Dataset:
        if data is None:
            raise RuntimeError(f"{name} is not built yet: call setup() first.")
        return data


def load_tokenizer(name: str, max_length: Tuple[int, str]) -> PreTrainedTokenizerBase:
    """The tokenizer of bundled name, hub id or folder ``name``, prepared by :func:`prepared_tokenizer`."""
    return prepared_tokenizer(AutoTokenizer.from_pretrained(resolve_model(name)), name, max_length)


def prepared_tokenizer(
    tokenizer: PreTrainedTokenizerBase, name: str, max_length: Tuple[int, str]
) -> PreTrainedTokenizerBase:
    """``tokenizer`` (called ``name`` in messages) padding with its eos token when it has no pad token, checked to
    allow ``max_length`` = (tokens, the arguments that set them) tokens."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer={name!r} has neither a pad nor an eos token to pad batches with.")
        tokenizer.pad_token = tokenizer.eos_token
        rank_zero_info(f"tokenizer={name!r} has no pad token; padding with its eos token {tokenizer.eos_token!r}.")
    limit = tokenizer.model_max_length
    length, arguments = max_length
    if limit < _NO_LENGTH_LIMIT and length > limit:
        raise ValueError(f"{arguments} exceeds what tokenizer={name!r} allows: at most {limit} tokens.")
    return tokenizer


def special_tokens(tokenizer: PreTrainedTokenizerBase, name: str) -> Tuple[List[int], List[int]]:
    """The special tokens ``tokenizer`` (called ``name`` in errors) puts before and after one sequence."""
    word = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    start = next((i for i in range(len(full) - len(word) + 1) if full[i : i + len(word)] == word), None)
    if start is None:
        raise ValueError(f"Cannot locate the special tokens that tokenizer={name!r} adds.")
    return full[:start], full[start + len(word) :]


def column_values(data: datasets.Dataset, column: str) -> List[Any]:
    """A column as Python values (through Arrow: iterating a ``Column`` is slow)."""
    return data.with_format("arrow")[column].to_pylist()


def tokenizer_difference(ours: PreTrainedTokenizerBase, theirs: PreTrainedTokenizerBase) -> Optional[str]:
    """How two tokenizers would give a model different ids, or ``None`` when they give the same.

    What the model reads are ids, so the vocabularies (token -> id) must be equal and a probe text must encode
    alike (normalisation, special tokens); the names may differ (a hub id and a local copy of it). The pad token
    is not compared: padding is masked out."""
    vocabulary, other = ours.get_vocab(), theirs.get_vocab()
    if vocabulary != other:
        shared = sum(other.get(token) == index for token, index in vocabulary.items())
        return (f"their vocabularies differ ({len(vocabulary)} and {len(other)} tokens, {shared} with the same id in "
                "both)")
    if ours(_PROBE_TEXT)["input_ids"] != theirs(_PROBE_TEXT)["input_ids"]:
        return f"they encode {_PROBE_TEXT!r} differently"
    if ours.mask_token_id != theirs.mask_token_id:
        return f"their mask tokens differ ({ours.mask_token!r} and {theirs.mask_token!r})"
    return None
