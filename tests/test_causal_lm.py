"""PrefixTunedCausalLM: target-token losses, DP per-example gradients, generation with the prefix, metrics,
callbacks; each checked against an independent computation (the plain Hugging Face LM, its own loss, its
own generate, per-example autograd, hand-written greedy decoding, a hand-computed perplexity)."""
import json
import math
from functools import partial

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, DynamicCache

from pflat_lightning import PrefixConfig, PrefixTunedCausalLM, PrivacyConfig
from pflat_lightning.callbacks import AdversarialWeightPerturbation, SharpnessLayerSelection, TeacherDistillation
from pflat_lightning.datamodules.text_generation import GenerationCollator
from pflat_lightning.privacy import PoissonDataLoader

from helpers import SEEDED_REASONS, clipped_mean, greedy_by_hand, quiet_trainer

SEPARATOR, EOS, PAD = 1031, 102, 0  # "=" and [SEP] of the WordPiece vocabulary the tiny models share
WORDS = (2000, 3000)  # ordinary-word ids


def pairs(size, seed, max_source=6, max_target=5):
    """Random (source, target) token pairs of varying lengths."""
    g = torch.Generator().manual_seed(seed)
    lengths = lambda top: int(torch.randint(2, top + 1, (1,), generator=g))  # noqa: E731
    return [(torch.randint(*WORDS, (lengths(max_source),), generator=g).tolist(),
             torch.randint(*WORDS, (lengths(max_target),), generator=g).tolist()) for _ in range(size)]


def examples(token_pairs, references=None):
    """Rows as the text-generation datamodule stores them: prompt + target + eos, labels on the target."""
    rows = []
    for i, (source, target) in enumerate(token_pairs):
        prompt = source + [SEPARATOR]
        row = {"input_ids": prompt + target + [EOS], "labels": [-100] * len(prompt) + target + [EOS]}
        if references is not None:
            row.update(source_input_ids=prompt, references=references[i])
        rows.append(row)
    return rows


class GenerationData(pl.LightningDataModule):
    """Token pairs in the datamodule's batch contract (its own collator); Poisson training batches."""

    def __init__(self, size=32, batch_size=8, val=None, seed=0) -> None:
        super().__init__()
        self.train = examples(pairs(size, seed))
        self.val = val or examples(pairs(12, seed + 1), [["a reply"]] * 12)
        self.batch_size, self.poisson_sampling, self.seed = batch_size, True, seed
        self.collate = GenerationCollator(PAD)

    def train_dataloader(self):
        if self.poisson_sampling:
            return PoissonDataLoader(self.train, expected_batch_size=self.batch_size, collate_fn=self.collate,
                                     seed=self.seed)
        return DataLoader(self.train, batch_size=self.batch_size, collate_fn=self.collate)

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=6, collate_fn=self.collate)

    test_dataloader = val_dataloader

    def public_dataloader(self, batch_size=None, shuffle=False):
        return DataLoader(examples(pairs(16, 99)), batch_size=batch_size or 8, shuffle=shuffle, collate_fn=self.collate)


def make(path, privacy=None, **kwargs):
    torch.manual_seed(0)
    kwargs.setdefault("prefix", PrefixConfig(num_virtual_tokens=3))
    return PrefixTunedCausalLM(path, privacy=privacy or PrivacyConfig(enabled=False), **kwargs)


def batch_of(rows):
    return GenerationCollator(PAD)(rows)


def hf_example_loss(module, input_ids, attention_mask, labels):
    """Reference: one example's loss from Hugging Face's own causal-LM loss (mean over scored tokens), the
    prefix handed to the backbone as its key/value cache."""
    model = module.model
    cache = DynamicCache()
    for layer, (key, value) in enumerate(model.prefix(1)):
        cache.update(key, value, layer)
    p = model.prefix.num_virtual_tokens
    full_mask = torch.cat([torch.ones(1, p, dtype=torch.long), attention_mask], 1)
    out = model.backbone(input_ids=input_ids, attention_mask=full_mask,
                         position_ids=p + torch.arange(input_ids.shape[1]).unsqueeze(0), past_key_values=cache,
                         labels=labels)
    return out.loss


# ---------------------------------------------------------------- losses
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_prefix_initialised_from_tokens_reads_like_the_plain_lm_continuing_them(family, tiny_model_dir):
    """The prefix (from real tokens' keys and values) sits before the tokens, at the positions after it: the
    log-probabilities equal the plain LM's on the concatenation, on a right-padded batch."""
    path = tiny_model_dir(family)
    module = make(path, prefix=PrefixConfig(num_virtual_tokens=3,
                                            init_text="the film was long but the ending was worth it")).eval()
    init = module.tokenizer("the film was long but the ending was worth it", add_special_tokens=False)["input_ids"][:3]
    assert "prefix initialisation" in {e.component for e in module.ledger.entries}
    batch = batch_of(examples(pairs(4, seed=3)))
    plain = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        log_probs, mask = module.token_log_probs(batch)
        ids = torch.cat([torch.tensor([init] * 4), batch["input_ids"]], 1)
        full_mask = torch.cat([torch.ones(4, 3, dtype=torch.long), batch["attention_mask"]], 1)
        expected = plain(input_ids=ids, attention_mask=full_mask).logits.log_softmax(-1)[:, 2:-1]
    labels = batch["labels"]
    assert torch.equal(mask, labels != -100)
    want = expected.gather(2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)[mask]
    torch.testing.assert_close(log_probs[mask], want, atol=1e-5, rtol=1e-4)
    assert torch.all(log_probs[~mask] == 0)


def test_clone_untrained_shares_the_backbone_and_restarts_from_the_init_text(tiny_model_dir):
    text = "the film was long but the ending was worth it"
    module = make(tiny_model_dir("llama"), prefix=PrefixConfig(num_virtual_tokens=3, init_text=text),
                  generate_max_new_tokens=4)
    initial = [p.detach().clone() for p in module.model.prefix.parameters()]
    with torch.no_grad():
        for p in module.model.prefix.parameters():
            p.add_(1.0)  # as a training would
    clone = module.clone_untrained()
    assert type(clone) is PrefixTunedCausalLM and clone.generate_max_new_tokens == 4
    assert clone.model.backbone is module.model.backbone and clone.model.lm_head is module.model.lm_head
    for mine, first in zip(clone.model.prefix.parameters(), initial):
        assert torch.equal(mine, first)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_example_losses_are_each_examples_mean_target_nll(family, tiny_model_dir):
    module = make(tiny_model_dir(family)).eval()
    batch = batch_of(examples(pairs(5, seed=4)))
    with torch.no_grad():
        losses = module.example_losses(batch)
        expected = [hf_example_loss(module, batch["input_ids"][i : i + 1], batch["attention_mask"][i : i + 1],
                                    batch["labels"][i : i + 1]) for i in range(5)]
    assert losses.shape == (5,)
    torch.testing.assert_close(losses, torch.stack(expected), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- DP
@pytest.mark.parametrize("mode", ["hooks", "ghost"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_noiseless_update_is_mean_of_clipped_per_example_gradients(family, mode, tiny_model_dir, tmp_path):
    """A logical batch of 8 in physical chunks of 3: the update equals the hand-clipped mean of per-example
    autograd gradients of Hugging Face's own loss."""
    path = tiny_model_dir(family)
    data = GenerationData()
    data.poisson_sampling = False
    first = batch_of(data.train[:8])
    reference = make(path)
    params = [p for p in reference.model.parameters() if p.requires_grad]
    one = [{k: v[i : i + 1] for k, v in first.items()} for i in range(8)]
    grads = [torch.autograd.grad(hf_example_loss(reference, x["input_ids"], x["attention_mask"], x["labels"]), params)
             for x in one]
    norms = torch.stack([torch.cat([g.flatten() for g in gs]).norm() for gs in grads])
    clip = float(norms.median())  # half of the examples are clipped
    module = make(path, max_physical_batch_size=3, optimizer=partial(torch.optim.SGD, lr=1.0),
                  privacy=PrivacyConfig(noise_multiplier=0.0, target_epsilon=None, max_grad_norm=clip,
                                        poisson_sampling=False, grad_sample_mode=mode))
    before = torch.cat([p.detach().flatten().clone() for p in module.model.parameters() if p.requires_grad])
    quiet_trainer(tmp_path, max_steps=1).fit(module, datamodule=data)
    after = torch.cat([p.detach().flatten() for p in module.model.parameters() if p.requires_grad])
    torch.testing.assert_close(before - after, clipped_mean(grads, clip, 8), atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------- generation
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_generate_is_greedy_decoding_of_the_prefixed_model(family, tiny_model_dir):
    path = tiny_model_dir(family)
    module = make(path, prefix=PrefixConfig(num_virtual_tokens=3, init_std=2.0)).eval()
    batch = batch_of(examples(pairs(4, seed=5), references=[["x"]] * 4))
    prompts, prompt_mask = batch["source_input_ids"], batch["source_attention_mask"]
    assert (prompt_mask[:, 0] == 0).any(), "the test needs left padding"
    generated = module.generate(prompts, prompt_mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(generated, greedy_by_hand(module, prompts, prompt_mask, 6, EOS, PAD))
    # Left padding is invisible: the first new token is the right-padded training row's prediction.
    with torch.no_grad():
        right = batch_of([{"input_ids": row[m.bool()].tolist(), "labels": row[m.bool()].tolist()}
                          for row, m in zip(prompts, prompt_mask)])
        logits = module(right["input_ids"], right["attention_mask"])
    last = right["attention_mask"].sum(1) - 1
    assert torch.equal(generated[:, prompts.shape[1]], logits[torch.arange(4), last].argmax(-1))
    plain = AutoModelForCausalLM.from_pretrained(path).eval()
    without = plain.generate(input_ids=prompts, attention_mask=prompt_mask, max_new_tokens=6, do_sample=False,
                             pad_token_id=PAD, eos_token_id=EOS)
    assert not torch.equal(generated, without), "the prefix must change what is generated"


# ---------------------------------------------------------------- a DP run, metrics and report
def test_dp_fit_then_validation_perplexity_bleu_rouge_and_report(tiny_model_dir, tmp_path):
    path = tiny_model_dir("gpt2")
    module = make(path, generate_max_new_tokens=8, num_generation_batches=1, num_samples=2,
                  privacy=PrivacyConfig(target_epsilon=8.0))
    data = GenerationData()
    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_val_batches=None)
    trainer.fit(module, datamodule=data)
    report = json.loads((tmp_path / "privacy_report.json").read_text())
    assert 7.9 < report["epsilon"] <= 8.0 and report["reasons"] == SEEDED_REASONS
    assert {"val_loss", "val_ppl", "val_bleu", "val_rougeL"} <= set(report["metrics"])
    assert len(report["callbacks"]["samples"]["val"]) == 2

    # Perplexity by hand: exp of the total target-token NLL over the total count, across both batches.
    module.eval()
    total = count = 0.0
    for row in data.val:
        one = batch_of([row])
        tokens = sum(label != -100 for label in row["labels"])
        with torch.no_grad():
            total += float(hf_example_loss(module, one["input_ids"], one["attention_mask"], one["labels"])) * tokens
        count += tokens
    # BLEU and ROUGE-L: references holding the greedy continuation (decoded by hand) score 1.
    first = batch_of(data.val[:6])
    ids = greedy_by_hand(module, first["source_input_ids"], first["source_attention_mask"], 8, EOS, PAD)
    texts = [t.strip() for t in module.tokenizer.batch_decode(ids[:, first["source_input_ids"].shape[1]:],
                                                               skip_special_tokens=True)]
    assert all(len(t.split()) >= 4 for t in texts), "BLEU-4 needs four words"
    references = [[text, "nothing alike"] for text in texts] + [["x"]] * 6
    exact = GenerationData(val=[{**row, "references": refs} for row, refs in zip(data.val, references)])
    metrics = quiet_trainer(tmp_path, limit_val_batches=None).validate(module, datamodule=exact, verbose=False)[0]
    assert metrics["val_ppl"] == pytest.approx(math.exp(total / count), rel=1e-4)
    assert metrics["val_bleu"] == pytest.approx(1.0) and metrics["val_rougeL"] == pytest.approx(1.0)
    different = GenerationData(val=[{**row, "references": ["zzz qqq"]} for row in data.val])
    metrics = quiet_trainer(tmp_path, limit_val_batches=None).validate(module, datamodule=different, verbose=False)[0]
    assert metrics["val_bleu"] == 0.0 and metrics["val_rougeL"] == 0.0


def test_validation_before_fit_then_fit_with_generation_metrics_off(tiny_model_dir, tmp_path):
    """The un-tuned model's validation (inference mode) leaves metric states that a later fit can update."""
    module = make(tiny_model_dir("gpt2"), num_generation_batches=0)
    trainer = quiet_trainer(tmp_path, limit_val_batches=None, max_epochs=1)
    untuned = trainer.validate(module, datamodule=GenerationData(), verbose=False)[0]
    assert set(untuned) == {"val_loss", "val_ppl"}
    trainer.fit(module, datamodule=GenerationData())
    assert trainer.callback_metrics["val_ppl"] < untuned["val_ppl"]


# ---------------------------------------------------------------- callbacks
def test_flattening_callbacks_run_on_the_causal_lm_with_a_formal_guarantee(tiny_model_dir, tmp_path):
    module = make(tiny_model_dir("llama"), privacy=PrivacyConfig(target_epsilon=8.0), num_generation_batches=0)
    awp = AdversarialWeightPerturbation(gamma=0.05)
    selection = SharpnessLayerSelection(keep_layers=1, at_epoch=0, data="public", direction="data", num_batches=1)
    teacher = TeacherDistillation("public", weight=0.01, teacher_epochs=1, teacher_batch_size=8)
    quiet_trainer(tmp_path, max_epochs=2, callbacks=[awp, selection, teacher]).fit(module, datamodule=GenerationData())
    report = module.privacy_report()
    assert report["reasons"] == SEEDED_REASONS, "nothing but the seeded randomness voids the guarantee"
    assert awp.perturbed_steps > 0
    assert len(report["callbacks"]["SharpnessLayerSelection"]["kept_layers"]) == 1
    assert module.prefix.active_layers == report["callbacks"]["SharpnessLayerSelection"]["kept_layers"]
    assert report["callbacks"]["TeacherDistillation"]["teacher"] == "public"


def test_logit_distillation_is_refused_before_a_teacher_is_trained(tiny_model_dir, tmp_path):
    module = make(tiny_model_dir("gpt2"), privacy=PrivacyConfig(target_epsilon=8.0))
    teacher = TeacherDistillation("public", logit_weight=0.5)
    refused = r"TeacherDistillation\(logit_weight=0.5\) cannot be used with PrefixTunedCausalLM"
    with pytest.raises(ValueError, match=refused):
        quiet_trainer(tmp_path, max_steps=1, callbacks=[teacher]).fit(module, datamodule=GenerationData())
    assert teacher.teacher_state is None


# ---------------------------------------------------------------- bad input
def test_bad_input_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="generation needs a causal LM: gpt2, llama"):
        make(tiny_model_dir("bert"))
    with pytest.raises(ValueError, match="num_generation_batches must be an integer >= 0, got -1"):
        make(tiny_model_dir("gpt2"), num_generation_batches=-1)
    with pytest.raises(ValueError, match="init_text='short' is 1 tokens for this tokenizer, fewer than num_virtual_tokens=3"):
        make(tiny_model_dir("gpt2"), prefix=PrefixConfig(num_virtual_tokens=3, init_text="short"))
    with pytest.raises(ValueError, match="reparametrised prefix"):
        make(tiny_model_dir("gpt2"),
             prefix=PrefixConfig(num_virtual_tokens=3, reparam_hidden=8, init_text="a long enough public text"))
