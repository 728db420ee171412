"""Membership-inference attacks: metrics, scores, LiRA and the audit callback, against hand computations."""
import copy
import csv
import json
import zlib
from functools import partial

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from matplotlib.image import imread
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, GPT2LMHeadModel

from pflat_lightning import PrefixConfig, PrefixTunedClassifier, PrivacyConfig
from pflat_lightning.attacks import (
    attack_metrics,
    balanced_subsets,
    dp_attack_bound,
    dp_tpr_bound,
    example_statistics,
    keep_matrix,
    lira_offline_scores,
    min_k_percent,
    plot_roc,
    roc_curve,
    run_audit,
    scaled_confidence,
    scoring_mode,
    trainable_state,
)
from pflat_lightning.attacks.audit import formal_guarantee
from pflat_lightning.callbacks import MembershipInferenceAudit
from pflat_lightning.datamodules import TextClassificationDataModule
from pflat_lightning.protocol import untrained_clone

from helpers import TokenDataModule, TokenDataset, collate, quiet_trainer

NUM_LABELS = 4  # with random labels a memorised non-member is right 1 time in 4: loss AUC about 0.9


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine the spinning threads
    made a 100-step tiny fit take 28 s instead of 0.9 s. Restored after this file."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- hand computations
def pair_auc(members, non_members):
    """AUC as the share of (member, non-member) pairs ranked right, ties counting one half."""
    m, n = np.asarray(members)[:, None], np.asarray(non_members)[None, :]
    return float(((m > n) + 0.5 * (m == n)).mean())


def hand_roc(members, non_members):
    """(fpr, tpr) of "score >= t" for t in +inf and every distinct score, by sorting."""
    members, non_members = np.asarray(members), np.asarray(non_members)
    thresholds = np.concatenate([[np.inf], np.sort(np.unique(np.concatenate([members, non_members])))[::-1]])
    return [(float((non_members >= t).mean()), float((members >= t).mean()), t) for t in thresholds]


def random_labelled(size, seed):
    data = TokenDataset(size, seed=seed)
    data.labels = torch.randint(0, NUM_LABELS, (size,), generator=torch.Generator().manual_seed(seed))
    return data


def classifier(path, privacy=None, lr=0.1):
    torch.manual_seed(0)
    return PrefixTunedClassifier(path, NUM_LABELS, prefix=PrefixConfig(num_virtual_tokens=4),
                                 optimizer=partial(torch.optim.AdamW, lr=lr),
                                 privacy=privacy or PrivacyConfig(enabled=False))


def hand_losses(module, data):
    batch = collate([data[i] for i in range(len(data))])
    module.eval()
    with torch.no_grad():
        logits = module.model(batch["input_ids"], batch["attention_mask"])
    return F.cross_entropy(logits, batch["labels"], reduction="none").double()


# ---------------------------------------------------------------- metrics
def test_metrics_match_pair_counting_and_sorting():
    g = torch.Generator().manual_seed(0)
    members = torch.randint(0, 400, (1200,), generator=g).double() + 30  # ties, and beyond a sigmoid's range
    non_members = torch.randint(0, 380, (1100,), generator=g).double() + 30
    scores, is_member = torch.cat([members, non_members]), torch.cat([torch.ones(1200), torch.zeros(1100)])
    metrics = attack_metrics(scores, is_member)
    assert metrics["auc"] == pytest.approx(pair_auc(members, non_members), abs=1e-6)
    roc = hand_roc(members.numpy(), non_members.numpy())
    best = max(roc, key=lambda p: (p[1] + 1 - p[0]) / 2)
    assert metrics["mia_accuracy"] == pytest.approx((best[1] + 1 - best[0]) / 2, abs=1e-6)
    assert metrics["threshold"] == best[2]
    for key, target in (("tpr_at_1pct_fpr", 0.01), ("tpr_at_0.1pct_fpr", 0.001)):
        assert metrics[key] == pytest.approx(max(tpr for fpr, tpr, _ in roc if fpr <= target), abs=1e-6)
        assert metrics[f"{key}_resolvable"] is True
    assert metrics["num_non_members"] == 1100 and metrics["fpr_resolution"] == pytest.approx(1 / 1100)
    curve = roc_curve(scores, is_member)
    assert [(round(f, 6), round(t, 6)) for f, t, _ in roc] == [
        (round(f, 6), round(t, 6)) for f, t in zip(curve.fpr.tolist(), curve.tpr.tolist())]


def test_metrics_keep_large_scores_apart_and_flag_unresolvable_fprs():
    # a sigmoid would map all of these to 1.0 in float32 and call the attack chance
    metrics = attack_metrics(torch.tensor([50.0, 60.0, 70.0, 20.0, 30.0, 40.0]), torch.tensor([1, 1, 1, 0, 0, 0]))
    assert metrics["auc"] == 1.0 and metrics["mia_accuracy"] == 1.0 and metrics["threshold"] == 50.0
    assert metrics["tpr_at_1pct_fpr"] == 1.0 and metrics["tpr_at_1pct_fpr_resolvable"] is False
    # 1 false positive in 1000 is FPR 0.1 % exactly (float32 would make it 0.00100000005, above the target)
    scores = torch.cat([torch.tensor([3.0]), torch.zeros(999), torch.full((10,), 2.0)])
    exact = attack_metrics(scores, torch.cat([torch.zeros(1000), torch.ones(10)]))
    assert exact["tpr_at_0.1pct_fpr"] == 1.0 and exact["tpr_at_0.1pct_fpr_resolvable"] is True
    chance = attack_metrics(torch.zeros(10), torch.tensor([1, 0] * 5))
    assert chance["auc"] == 0.5 and chance["mia_accuracy"] == 0.5
    with pytest.raises(ValueError, match="both members and non-members"):
        attack_metrics(torch.ones(3), torch.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        attack_metrics(torch.tensor([float("nan"), 1.0]), torch.tensor([1, 0]))


def test_roc_plot_is_a_png(tmp_path):
    is_member = torch.tensor([1, 1, 0, 0])
    curves = {"loss": roc_curve(torch.tensor([3.0, 1.0, 2.0, 0.0]), is_member),
              "reference": roc_curve(torch.tensor([3.0, 2.0, 1.0, 0.0]), is_member)}
    path = plot_roc(curves, tmp_path / "sub" / "roc.png", aucs={"loss": 0.75, "reference": 1.0})
    image = imread(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.shape[0] > 100 and image.shape[1] > 100
    bounded = imread(plot_roc(curves, tmp_path / "bounded.png", dp_bound=dp_attack_bound(1.0, 1e-5)))
    assert bounded.shape == image.shape and not np.array_equal(bounded, image), "the DP bound is drawn"


# ---------------------------------------------------------------- what a DP guarantee allows
def hand_region(fpr, epsilon, delta):
    """The two DP inequalities for an attack's answer "member", written out:
    TPR <= e^eps FPR + delta, and for the answer "non-member" 1 - FPR <= e^eps (1 - TPR) + delta."""
    return np.minimum.reduce([np.ones_like(fpr), np.exp(epsilon) * fpr + delta,
                              1 - np.exp(-epsilon) * (1 - delta - fpr)])


@pytest.mark.parametrize("epsilon, delta", [(0.5, 0.0), (1.0, 1e-5), (3.0, 1e-5), (8.0, 5.55e-5), (2.0, 0.05)])
def test_dp_bound_is_the_best_point_and_area_of_the_privacy_region(epsilon, delta):
    fpr = np.linspace(0, 1, 2_000_001)
    region = hand_region(fpr, epsilon, delta)
    bound = dp_attack_bound(epsilon, delta)
    assert bound["max_mia_accuracy"] == pytest.approx(((1 + region - fpr) / 2).max(), abs=1e-6)
    assert bound["max_auc"] == pytest.approx(np.trapezoid(region, fpr), abs=1e-6)
    assert bound["max_tpr_at_1pct_fpr"] == pytest.approx(hand_region(np.array(0.01), epsilon, delta), abs=1e-12)
    assert np.allclose(dp_tpr_bound(torch.tensor(fpr[::1000]), epsilon, delta).numpy(), region[::1000])


def test_randomised_response_reaches_the_pure_dp_bound():
    """Randomised response (report the true bit with probability e^eps / (1 + e^eps)) is eps-DP and its
    best attack meets the bound exactly: the bound is tight."""
    epsilon = 1.3
    keep = np.exp(epsilon) / (1 + np.exp(epsilon))
    tpr, fpr = keep, 1 - keep  # attack: "member" when the released bit says so
    assert dp_attack_bound(epsilon, 0.0)["max_mia_accuracy"] == pytest.approx((1 + tpr - fpr) / 2, abs=1e-12)
    assert dp_attack_bound(epsilon, 0.0)["max_auc"] == pytest.approx((1 + tpr - fpr) / 2, abs=1e-12)


@pytest.mark.parametrize("sigma", [0.7, 1.5, 4.0])
def test_gaussian_mechanism_stays_inside_the_bound_of_opacus_epsilon(sigma):
    """One Gaussian release of a sensitivity-1 sum: its exact trade-off (Dong, Roth and Su 2019)
    TPR = Phi(Phi^-1(FPR) + 1/sigma) never exceeds the bound of the (eps, delta) Opacus' RDP accountant gives."""
    from opacus.accountants import RDPAccountant

    delta = 1e-5
    accountant = RDPAccountant()
    accountant.history = [(sigma, 1.0, 1)]
    epsilon = accountant.get_epsilon(delta=delta)
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    fpr = torch.logspace(-8, 0, 400, dtype=torch.float64).clamp(max=1 - 1e-12)
    gaussian = normal.cdf(normal.icdf(fpr) + 1 / sigma)
    assert bool((gaussian <= dp_tpr_bound(fpr, epsilon, delta) + 1e-12).all())
    bound = dp_attack_bound(epsilon, delta)
    assert float(normal.cdf(torch.tensor(1 / (2 * sigma)))) <= bound["max_mia_accuracy"]
    assert float(normal.cdf(torch.tensor(1 / (sigma * 2**0.5)))) <= bound["max_auc"]


def test_dp_bound_refuses_bad_parameters():
    with pytest.raises(ValueError, match="epsilon=-1"):
        dp_attack_bound(-1.0, 1e-5)
    with pytest.raises(ValueError, match="delta=1.0"):
        dp_attack_bound(1.0, 1.0)


# ---------------------------------------------------------------- LiRA pieces
def test_scaled_confidence_is_the_logit_of_the_true_class_probability():
    logits = torch.randn(50, 3, dtype=torch.float64) * 6
    labels = torch.randint(0, 3, (50,))
    probs = logits.softmax(-1)
    p = probs[torch.arange(50), labels]
    others = probs.sum(-1) - p
    expected = torch.log(p) - torch.log(others)
    losses = F.cross_entropy(logits, labels, reduction="none")
    assert torch.allclose(scaled_confidence(losses, "logit"), expected, rtol=1e-6, atol=1e-9)
    assert torch.equal(scaled_confidence(losses, "negative_loss"), -losses)
    assert torch.isfinite(scaled_confidence(torch.tensor([1e-12, 0.0, 50.0]), "logit")).all()
    with pytest.raises(ValueError, match="kind"):
        scaled_confidence(losses, "probability")


def test_keep_matrix_puts_each_example_in_half_the_shadows():
    keep = keep_matrix(4, 100, seed=3)
    assert keep.shape == (4, 100) and (keep.sum(0) == 2).all()
    assert torch.equal(keep, keep_matrix(4, 100, seed=3)) and not torch.equal(keep, keep_matrix(4, 100, seed=4))
    with pytest.raises(ValueError, match="shadow_models >= 2"):
        keep_matrix(1, 10, seed=0)


def test_lira_offline_scores_by_hand():
    g = torch.Generator().manual_seed(0)
    shadows = torch.randn(6, 5, generator=g, dtype=torch.float64)
    target = torch.randn(5, generator=g, dtype=torch.float64)
    keep = keep_matrix(6, 5, seed=1)
    out_values = [shadows[~keep[:, i], i].numpy() for i in range(5)]
    own, fixed = lira_offline_scores(target, shadows, keep, min_out_for_variance=2)
    expected = [(target[i].item() - v.mean()) / v.std(ddof=1) for i, v in enumerate(out_values)]
    assert fixed == 0 and np.allclose(own.numpy(), expected)
    pooled, fixed = lira_offline_scores(target, shadows, keep, min_out_for_variance=8)
    global_std = np.concatenate(out_values).std()
    assert fixed == 5 and np.allclose(pooled.numpy(), [(target[i].item() - v.mean()) / global_std
                                                        for i, v in enumerate(out_values)])


def test_shadows_are_untrained_clones_of_the_audited_recipe_sharing_its_backbone(tiny_model_dir):
    module = classifier(tiny_model_dir("bert"), lr=0.05)
    torch.manual_seed(1)
    shadow = untrained_clone(module)
    assert type(shadow) is type(module) and shadow.hparams == module.hparams
    assert shadow.optimizer_factory is module.optimizer_factory
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    theirs = dict(shadow.named_parameters())
    for name, param in module.named_parameters():
        assert torch.equal(param, theirs[name]) != (name in trainable), name
        assert (param.data_ptr() == theirs[name].data_ptr()) != (name in trainable), name


# ---------------------------------------------------------------- scoring
def test_scoring_mode_drops_regularisers_and_restores_the_module(tiny_model_dir):
    module = classifier(tiny_model_dir("bert"))
    module.train()
    module.model.backbone.eval()  # a frozen part kept in eval mode must stay so
    modes = {name: m.training for name, m in module.named_modules()}
    term = lambda batch, logits, prefix: torch.full((logits.shape[0],), 100.0)  # noqa: E731
    module.loss_terms.append(term)
    terms = module.loss_terms
    data = random_labelled(12, seed=5)
    stats = example_statistics(module, DataLoader(data, batch_size=5, collate_fn=collate))
    assert torch.allclose(stats.losses, hand_losses(module, data), atol=1e-6)  # no +100: the term was off
    module.train()
    for name, m in module.named_modules():
        m.training = modes[name]
    with scoring_mode(module):
        assert not module.training and module.loss_terms == [] and not torch.is_grad_enabled()
    assert module.loss_terms is terms and terms == [term]
    assert {name: m.training for name, m in module.named_modules()} == modes


# ---------------------------------------------------------------- the callback on an overfit tiny model
@pytest.fixture(scope="module")
def overfit_run(tiny_model_dir, tmp_path_factory):
    """A non-private tiny BERT prefix that memorised 32 randomly labelled examples, audited by the callback."""
    folder = tmp_path_factory.mktemp("overfit")
    module = classifier(tiny_model_dir("bert"))
    before = copy.deepcopy(module)
    data = TokenDataModule(32, batch_size=8, poisson=False)
    data.dataset = random_labelled(32, seed=0)
    non_members = random_labelled(32, seed=1)
    callback = MembershipInferenceAudit(("loss", "reference"), num_examples=None,
                                        members=DataLoader(data.dataset, batch_size=16, collate_fn=collate),
                                        non_members=DataLoader(non_members, batch_size=16, collate_fn=collate))
    trainer = quiet_trainer(folder, max_epochs=25, callbacks=[callback], logger=CSVLogger(folder, name="logs"))
    trainer.fit(module, datamodule=data)
    return dict(module=module, before=before, members=data.dataset, non_members=non_members, callback=callback,
                trainer=trainer, folder=folder)


def test_overfit_model_is_exposed_and_the_callback_reports_it(overfit_run):
    module, callback, trainer = overfit_run["module"], overfit_run["callback"], overfit_run["trainer"]
    members, non_members = overfit_run["members"], overfit_run["non_members"]
    trained = hand_losses(module, members), hand_losses(module, non_members)
    initial = hand_losses(overfit_run["before"], members), hand_losses(overfit_run["before"], non_members)
    results = callback.results["attacks"]
    assert results["loss"]["auc"] == pytest.approx(pair_auc(-trained[0], -trained[1]), abs=1e-6)
    assert results["loss"]["auc"] > 0.8, "a memorising model must be exposed by the loss attack"
    assert callback.results["dp_bound"] is None, "a non-private run has no guarantee to bound the attacks"
    assert results["reference"]["auc"] == pytest.approx(
        pair_auc(initial[0] - trained[0], initial[1] - trained[1]), abs=1e-6)
    folder = trainer.log_dir
    saved = json.loads((overfit_run["folder"] / "logs" / "version_0" / "membership_inference.json").read_text())
    assert saved["attacks"]["loss"]["auc"] == results["loss"]["auc"] and "privacy_note" in saved
    assert saved["num_members"] == saved["num_non_members"] == 32 and saved["reference"] == "initial"
    assert imread(f"{folder}/roc.png").shape[0] > 100
    report = json.loads(open(f"{folder}/privacy_report.json").read())
    section = report["callbacks"]["MembershipInferenceAudit"]
    assert section["attacks"]["loss"]["auc"] == results["loss"]["auc"] and "not" in section["privacy_note"]
    assert {"component": "MembershipInferenceAudit", "status": "evaluation"}.items() <= report["ledger"][0].items()
    assert "## MembershipInferenceAudit" in open(f"{folder}/privacy_report.md").read()
    assert float(trainer.callback_metrics["mia_loss_auc"]) == pytest.approx(results["loss"]["auc"])
    with open(f"{folder}/metrics.csv") as handle:
        logged = [row for row in csv.DictReader(handle) if row.get("mia_loss_auc")]
    assert float(logged[-1]["mia_loss_auc"]) == pytest.approx(results["loss"]["auc"])


def test_initial_reference_is_the_state_before_training_and_swapping_restores_the_weights(overfit_run):
    module, callback, before = overfit_run["module"], overfit_run["callback"], overfit_run["before"]
    original = dict(before.named_parameters())
    assert callback.initial_state.keys() == trainable_state(module).keys()
    assert all(torch.equal(value, original[name]) for name, value in callback.initial_state.items())
    weights = {name: p.detach().clone() for name, p in module.named_parameters()}
    run_audit(module, overfit_run["members"], overfit_run["non_members"], collate_fn=collate,
              reference=callback.initial_state, num_examples=8)
    assert all(torch.equal(p, weights[name]) for name, p in module.named_parameters())


def test_lira_trains_shadows_on_halves_of_the_pool_and_reports_its_cost(overfit_run):
    rng = torch.get_rng_state()
    result = run_audit(overfit_run["module"], overfit_run["members"], overfit_run["non_members"], collate_fn=collate,
                       attacks=("loss", "lira"), num_examples=16, shadow_models=2, shadow_epochs=2,
                       shadow_batch_size=8, seed=3)
    assert torch.equal(torch.get_rng_state(), rng), "the audit (shadows included) must not move the caller's RNG"
    lira = result.summary["lira"]
    assert lira["shadow_models"] == 2 and len(lira["wall_seconds_per_shadow"]) == 2
    assert sum(lira["shadow_training_examples"]) == 32, "each of the 32 pool examples trains exactly one of 2 shadows"
    assert lira["examples_with_fixed_variance"] == 32 and lira["confidence"] == "logit"
    assert 0.0 <= result.summary["attacks"]["lira"]["auc"] <= 1.0 and torch.isfinite(result.scores["lira"]).all()


def test_dp_training_hides_membership_that_non_private_training_exposes(tiny_model_dir, overfit_run, tmp_path):
    module = classifier(tiny_model_dir("bert"), privacy=PrivacyConfig(target_epsilon=1.0, secure_mode=True))
    data = TokenDataModule(64, batch_size=16, poisson=True)
    data.dataset = random_labelled(64, seed=10)
    callback = MembershipInferenceAudit(("loss",), num_examples=None,
                                        members=DataLoader(data.dataset, batch_size=32, collate_fn=collate),
                                        non_members=DataLoader(random_labelled(64, seed=11), batch_size=32,
                                                               collate_fn=collate))
    quiet_trainer(tmp_path, max_epochs=10, callbacks=[callback]).fit(module, datamodule=data)
    dp_auc = callback.results["attacks"]["loss"]["auc"]
    assert abs(dp_auc - 0.5) < 0.2 and dp_auc < overfit_run["callback"].results["attacks"]["loss"]["auc"] - 0.15
    report = module.privacy_report()
    assert report["formal_guarantee"] is True, "an 'evaluation' ledger entry leaves the guarantee intact"
    assert report["ledger"][0]["status"] == "evaluation"
    bound = callback.results["dp_bound"]  # what the run's own (epsilon, delta) allows any attack
    assert (bound["epsilon"], bound["delta"]) == (report["epsilon"], report["delta"]) == formal_guarantee(module)
    assert bound["max_mia_accuracy"] == pytest.approx(dp_attack_bound(report["epsilon"], report["delta"])["max_mia_accuracy"])
    assert callback.results["attacks"]["loss"]["mia_accuracy"] <= bound["max_mia_accuracy"]
    assert report["callbacks"]["MembershipInferenceAudit"]["dp_bound"] == bound
    module.ledger.record("AdversarialWeightPerturbation", "unaccounted", "raw private gradients")
    assert formal_guarantee(module) is None, "no guarantee, no bound"


def test_a_resumed_fit_audits_against_the_original_initial_state(tiny_model_dir, tmp_path):
    data = TokenDataModule(16, batch_size=8, poisson=False)
    members, non_members = DataLoader(data.dataset, collate_fn=collate), DataLoader(TokenDataset(16, seed=1), collate_fn=collate)
    first = MembershipInferenceAudit(members=members, non_members=non_members, num_examples=None)
    module = classifier(tiny_model_dir("bert"))
    initial = trainable_state(module)
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[first])
    trainer.fit(module, datamodule=data)
    trainer.save_checkpoint(tmp_path / "one.ckpt")
    second = MembershipInferenceAudit(members=members, non_members=non_members, num_examples=None)
    quiet_trainer(tmp_path, max_epochs=2, callbacks=[second]).fit(classifier(tiny_model_dir("bert"), lr=0.5),
                                                                 datamodule=data, ckpt_path=tmp_path / "one.ckpt")
    assert all(torch.equal(second.initial_state[name], value) for name, value in initial.items())


def test_balanced_subsets_take_the_smaller_size_with_a_seeded_choice():
    members, non_members = list(range(100, 140)), list(range(24))
    chosen = balanced_subsets(members, non_members, None, seed=0)
    assert [len(c) for c in chosen] == [24, 24]
    assert len(set(chosen[0])) == 24 and set(chosen[0]) <= set(members) and sorted(chosen[1]) == non_members
    again = balanced_subsets(members, non_members, None, seed=0)
    assert list(again[0]) == list(chosen[0]) and list(balanced_subsets(members, non_members, None, seed=1)[0]) != list(chosen[0])
    assert [len(c) for c in balanced_subsets(members, non_members, 10, seed=0)] == [10, 10]


def test_the_callback_audits_the_datamodules_train_split_against_its_test_split(tiny_model_dir, tmp_path):
    data = TextClassificationDataModule("sms_spam", tokenizer=tiny_model_dir("bert"), max_length=16, batch_size=8,
                                        max_train_examples=24, max_eval_examples=24)
    callback = MembershipInferenceAudit(("loss",), num_examples=None)
    module = PrefixTunedClassifier(tiny_model_dir("bert"), 2, privacy=PrivacyConfig(enabled=False),
                                   optimizer=partial(torch.optim.AdamW, lr=0.1))
    quiet_trainer(tmp_path, max_epochs=3, callbacks=[callback]).fit(module, datamodule=data)
    assert callback.results["num_members"] == callback.results["num_non_members"] == 24
    losses = []
    module.eval()
    for split in (data.train_dataset, data.test_dataset):
        batch = data.collate_fn([split[i] for i in range(len(split))])
        with torch.no_grad():
            logits = module.model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        losses.append(F.cross_entropy(logits, batch["labels"], reduction="none").double())
    assert callback.results["attacks"]["loss"]["auc"] == pytest.approx(pair_auc(-losses[0], -losses[1]), abs=1e-6)


def test_bad_arguments_and_token_attacks_on_a_classifier_are_refused(tiny_model_dir, tmp_path):
    for kwargs, match in (({"attacks": ("loss", "entropy")}, "attacks must be"),
                          ({"attacks": ("lira",)}, "shadow_models must be >= 2"),
                          ({"shadow_models": 3}, "add it to attacks"),
                          ({"num_examples": 0}, "num_examples"),
                          ({"min_k": 0.0}, "min_k"),
                          ({"members": [1]}, "together")):
        with pytest.raises(ValueError, match=match):
            MembershipInferenceAudit(**kwargs)
    module = classifier(tiny_model_dir("bert"))
    with pytest.raises(TypeError, match="token_log_probs"):
        quiet_trainer(tmp_path, max_epochs=1, callbacks=[MembershipInferenceAudit(("loss", "min_k"))]).fit(
            module, datamodule=TokenDataModule())
    with pytest.raises(ValueError, match="reference="):
        run_audit(module, TokenDataset(4), TokenDataset(4, seed=1), collate_fn=collate)


# ---------------------------------------------------------------- causal LM attacks on a real tiny GPT-2
class TinyCausalLM(pl.LightningModule):
    """A tiny GPT-2 that scores its target tokens (``labels != -100``): the causal-LM side of the protocol.

    ``aligned=True`` returns log-probabilities aligned with ``input_ids`` (column ``t`` scores token ``t``),
    ``False`` with the shifted targets (column ``t`` scores token ``t + 1``)."""

    def __init__(self, path: str, aligned: bool = False) -> None:
        super().__init__()
        self.model = GPT2LMHeadModel.from_pretrained(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.aligned = aligned
        self.loss_terms = []

    def token_log_probs(self, batch):
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]
        mask = targets != -100
        values = logits[:, :-1].log_softmax(-1).gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1) * mask
        if self.aligned:
            values, mask = F.pad(values, (1, 0)), F.pad(mask, (1, 0))
        return values, mask

    def example_losses(self, batch):
        values, mask = self.token_log_probs(batch)
        return -values.sum(1) / mask.sum(1)


SENTENCES = ["the movie was a delight from start to end", "a dull and plodding mess", "i laughed and i cried",
             "nothing about this film works at all", "a clever script and sharp performances",
             "the plot makes no sense whatsoever", "warm funny and surprisingly moving", "two hours i will never get back"]


def lm_examples(tokenizer, sentences, prompt_tokens=2):
    rows = []
    for text in sentences:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        rows.append({"input_ids": ids, "labels": [-100] * prompt_tokens + ids[prompt_tokens:]})
    return rows


def lm_collate(rows):
    width = max(len(r["input_ids"]) for r in rows)
    pad = lambda values, fill: torch.tensor([v + [fill] * (width - len(v)) for v in values])  # noqa: E731
    return {"input_ids": pad([r["input_ids"] for r in rows], 0), "labels": pad([r["labels"] for r in rows], -100),
            "attention_mask": pad([[1] * len(r["input_ids"]) for r in rows], 0)}


def hand_token_scores(path, rows, k):
    """Per example: mean target NLL, Min-K%, zlib ratio and scored text, from one unpadded forward per example."""
    model, tokenizer = GPT2LMHeadModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    losses, min_k, ratios, texts = [], [], [], []
    for row in rows:
        ids = torch.tensor([row["input_ids"]])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(ids).logits[0].double(), -1)
        positions = [t for t, label in enumerate(row["labels"]) if label != -100]
        values = sorted(float(log_probs[t - 1, row["input_ids"][t]]) for t in positions)
        loss = -sum(values) / len(values)
        losses.append(loss)
        min_k.append(sum(values[: max(1, int(k * len(values)))]) / max(1, int(k * len(values))))
        text = tokenizer.decode([row["input_ids"][t] for t in positions], skip_special_tokens=True)
        ratios.append(loss / len(zlib.compress(text.encode("utf-8"))))
        texts.append(text)
    return np.array(losses), np.array(min_k), np.array(ratios), texts


@pytest.mark.parametrize("aligned", [False, True])
def test_min_k_and_zlib_match_a_hand_computation_on_tiny_gpt2(tiny_model_dir, aligned):
    path = tiny_model_dir("gpt2")
    module = TinyCausalLM(path, aligned)
    rows = lm_examples(module.tokenizer, SENTENCES)
    stats = example_statistics(module, DataLoader(rows, batch_size=3, collate_fn=lm_collate), tokens=True)
    losses, min_k, ratios, texts = hand_token_scores(path, rows, k=0.3)
    assert np.allclose(stats.losses.numpy(), losses, atol=1e-5)
    assert np.allclose(min_k_percent(stats.token_log_probs, 0.3).numpy(), min_k, atol=1e-5)
    assert stats.texts == texts and texts[1] == "and plodding mess"
    result = run_audit(module, rows[:4], rows[4:], attacks=("loss", "min_k", "zlib"), collate_fn=lm_collate,
                       num_examples=None, min_k=0.3, batch_size=2)
    for name, scores in (("loss", -losses), ("min_k", min_k), ("zlib", -ratios)):
        assert result.summary["attacks"][name]["auc"] == pytest.approx(pair_auc(scores[:4], scores[4:]), abs=1e-6)
    assert result.summary["min_k_fraction"] == 0.3
