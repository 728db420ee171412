"""The black-box setting: scorers, the DP zeroth-order mechanism and BlackBoxPromptTuner, each checked
against an independent computation (a plain Hugging Face forward, a hand-written clipped sum, Opacus'
accountant)."""
import csv
import json
import math
import random
import sys
import threading
import urllib.error
import urllib.request
from functools import lru_cache, partial

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from opacus.accountants import PRVAccountant
from transformers import AutoModelForCausalLM, AutoTokenizer

from pflat_lightning import BlackBoxPromptTuner, PrivacyConfig
from pflat_lightning.checkpointing import AtomicCheckpointIO
from pflat_lightning.black_box import HTTPScorer, HuggingFaceScorer, ZerothOrderMechanism
from pflat_lightning.black_box.server import main as serve_scorer
from pflat_lightning.black_box.server import make_server
from pflat_lightning.datamodules import TextClassificationDataModule

from helpers import StopAfter, quiet_trainer

WORDS = ["bad", "good"]  # single tokens of the tiny models' WordPiece vocabulary
TEMPLATE = "{text} it was"
VOCAB = ["good", "bad", "film", "movie", "great", "awful", "plot", "actors", "slow", "funny", "the", "a"]


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    """A CSV of 60 short labelled texts (48 for training after the 10 % validation and test splits)."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("reviews") / "reviews.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for i in range(60):
            writer.writerow([" ".join(rng.choice(VOCAB) for _ in range(rng.randint(1, 9))), i % 2])
    return str(path)


@pytest.fixture(scope="module")
def scorers(tiny_model_dir):
    cache = {}

    def make(family: str) -> HuggingFaceScorer:
        if family not in cache:
            cache[family] = HuggingFaceScorer(tiny_model_dir(family), WORDS, template=TEMPLATE, batch_size=64)
        return cache[family]

    return make


def data_for(reviews, model_dir, **kwargs) -> TextClassificationDataModule:
    return TextClassificationDataModule("csv", data_files=reviews, tokenizer=model_dir, keep_text=True,
                                        max_length=32, **{"batch_size": 8, **kwargs})


def tuner_for(scorer, privacy, **kwargs) -> BlackBoxPromptTuner:
    settings = dict(num_prompt_tokens=3, intrinsic_dim=12, num_directions=3, smoothing=0.5, projection_scale=40.0,
                    privacy=privacy, optimizer=partial(torch.optim.SGD, lr=1.0))
    return BlackBoxPromptTuner(scorer, **{**settings, **kwargs})


@lru_cache(maxsize=None)
def plain_model(model_dir):
    return AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir).eval()


def reference_logits(model_dir, prompt, text):
    """Label-word logits from one plain forward: [CLS], the prompt, then the filled template, no padding."""
    tokenizer, model = plain_model(model_dir)
    ids = [tokenizer.cls_token_id] + tokenizer(text + " it was", add_special_tokens=False)["input_ids"]
    embedded = model.get_input_embeddings()(torch.tensor([ids]))
    inputs = torch.cat([embedded[:, :1], prompt[None], embedded[:, 1:]], dim=1)
    with torch.no_grad():
        logits = model(inputs_embeds=inputs).logits[0, -1]
    return logits[tokenizer.convert_tokens_to_ids(WORDS)]


class RecordBatches(Callback):
    """Keeps each training batch and the prompt vector z before its update."""

    def __init__(self):
        self.batches, self.z_before, self.released = [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch)
        self.z_before.append(pl_module.z.detach().clone())

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.released.append(pl_module.released_estimate.clone())


class RecordingScorer:
    """A scorer that remembers every prompt it was asked to score (and scores with a real one)."""

    def __init__(self, scorer):
        self.scorer, self.info, self.prompts = scorer, scorer.info, []

    def label_logits(self, prompts, texts):
        self.prompts.append(prompts.clone())
        return self.scorer.label_logits(prompts, texts)


# ---------------------------------------------------------------------------------------------------- scorers
@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2"])  # gemma2: soft-capped final logits
def test_scorer_equals_a_plain_forward_per_example(family, scorers, tiny_model_dir):
    """Padded, chunked (4 pairs a pass), prompt-after-[CLS] scoring equals one unpadded forward per (prompt, text)."""
    scorer = HuggingFaceScorer(tiny_model_dir(family), WORDS, template=TEMPLATE, batch_size=4)
    torch.manual_seed(0)
    prompts = torch.randn(2, 3, scorer.info.hidden_size) * 0.5
    texts = ["a good film", "the plot was slow and the actors awful", "funny"]
    logits = scorer.label_logits(prompts, texts)
    assert logits.shape == (2, 3, 2)
    for p in range(2):
        for b, text in enumerate(texts):
            torch.testing.assert_close(logits[p, b], reference_logits(tiny_model_dir(family), prompts[p], text),
                                       atol=1e-5, rtol=1e-4)
    assert not torch.allclose(logits[0], logits[1])  # the prompt reaches the output
    assert scorer.label_logits(prompts, []).shape == (2, 0, 2)
    assert scorer.info.embedding_std == pytest.approx(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir(family)).get_input_embeddings().weight.std().item())


def test_http_scores_equal_in_process_scores_and_bad_requests_get_400(scorers):
    scorer = scorers("gpt2")
    server = make_server(scorer, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        remote = HTTPScorer(url)
        assert remote.info == scorer.info
        torch.manual_seed(1)
        prompts = torch.randn(3, 2, scorer.info.hidden_size)
        texts = ["a good film", "awful", "the actors were funny but the plot slow"]
        assert torch.equal(remote.label_logits(prompts, texts), scorer.label_logits(prompts, texts))

        def post(body: bytes):
            request = urllib.request.Request(url + "/score", data=body, headers={"Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as caught:
                urllib.request.urlopen(request, timeout=30)
            return caught.value.code, json.loads(caught.value.read())["error"]

        good = prompts.tolist()
        cases = [
            (b"not json", "must be JSON"),
            (json.dumps([1, 2]).encode(), "JSON object with keys ['prompts', 'texts']"),
            (json.dumps({"prompts": good}).encode(), "missing ['texts']"),
            (json.dumps({"prompts": good, "texts": [], "labels": [1]}).encode(), "unknown ['labels']"),
            (json.dumps({"prompts": [[[1.0, 2.0]]], "texts": ["a"]}).encode(), "hidden_size=32), got (1, 1, 2)"),
            (json.dumps({"prompts": [[[1.0], [1.0, 2.0]]], "texts": ["a"]}).encode(), "nested list of numbers"),
            (json.dumps({"prompts": good, "texts": "a film"}).encode(), "texts must be a list of strings, got str"),
            (json.dumps({"prompts": good, "texts": ["a", 5]}).encode(), "texts[1] is 5 (int)"),
        ]
        for body, message in cases:
            status, error = post(body)
            assert status == 400 and message in error, (body[:40], error)
        with pytest.raises(ValueError, match=r"prompts must have shape"):
            remote.label_logits(torch.zeros(1, 2, 5), ["a"])  # checked client-side before sending
        with pytest.raises(ValueError, match=r"refused the request: texts must be a list of strings, got str"):
            remote._request("/score", {"prompts": good, "texts": "a film"})  # the server's 400 reaches the caller
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(url + "/weights", timeout=30)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_serve_scorer_command_serves_the_same_scores(scorers, tiny_model_dir):
    """``pflat serve-scorer`` in its own process, on a free port, stopped with SIGTERM."""
    import os
    import signal
    import subprocess

    command = [sys.executable, "-m", "pflat_lightning.cli", "serve-scorer", "--model", tiny_model_dir("gpt2"),
               "--label_words", *WORDS, "--template", TEMPLATE, "--batch_size", "64", "--port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        line = process.stdout.readline()
        assert line.startswith("Serving"), line + process.stderr.read()
        remote = HTTPScorer(line.split(" on ")[1].strip())
        prompts = torch.randn(2, 3, remote.info.hidden_size)
        texts = ["a good film", "slow plot"]
        assert torch.equal(remote.label_logits(prompts, texts), scorers("gpt2").label_logits(prompts, texts))
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()


def test_serve_scorer_refuses_bad_arguments(tiny_model_dir, capsys):
    base = ["--model", tiny_model_dir("gpt2"), "--label_words", "bad", "good"]
    assert serve_scorer([*base, "--template", "{sentence} it was"]) == 2
    error = capsys.readouterr().err
    assert "template must contain the plain field '{text}'" in error and "{sentence} it was" in error
    assert serve_scorer([*base, "--port", "70000"]) == 2
    assert "--port must be in [0, 65535], got 70000" in capsys.readouterr().err


def test_scorer_and_tuner_refuse_bad_input(scorers, tiny_model_dir, reviews, tmp_path):
    path = tiny_model_dir("gpt2")
    with pytest.raises(ValueError, match=r"label word 'unwatchable' is 3 tokens"):
        HuggingFaceScorer(path, ["unwatchable", "good"])
    with pytest.raises(ValueError, match=r"model=.* is a masked LM \(bert\)"):
        HuggingFaceScorer(tiny_model_dir("bert"), WORDS)
    with pytest.raises(ValueError, match=r"template must contain the plain field '\{text\}' exactly once.*'\{text\} \{text\}'"):
        HuggingFaceScorer(path, WORDS, template="{text} {text}")
    with pytest.raises(ValueError, match="max_length=2 leaves no room for text"):
        HuggingFaceScorer(path, WORDS, template=TEMPLATE, max_length=2)
    with pytest.raises(ValueError, match="label_words must list one word per class"):
        HuggingFaceScorer(path, "good")
    with pytest.raises(ValueError, match="url must start with http:// or https://, got 'localhost:1'"):
        HTTPScorer("localhost:1")
    scorer = scorers("gpt2")
    with pytest.raises(ValueError, match=r"prompts must have shape \(num_prompts >= 1, num_tokens >= 1, hidden_size=32\), got \(3, 32\)"):
        scorer.label_logits(torch.zeros(3, 32), ["a"])
    with pytest.raises(ValueError, match="prompts must be finite"):
        scorer.label_logits(torch.full((1, 1, 32), math.nan), ["a"])
    with pytest.raises(ValueError, match=r"texts\[0\] is None"):
        scorer.label_logits(torch.zeros(1, 1, 32), [None])
    private = PrivacyConfig(target_epsilon=8.0)
    for kwargs, message in [
        (dict(intrinsic_dim=0), "intrinsic_dim must be an integer >= 1, got 0"),
        (dict(num_directions=2.5), "num_directions must be an integer >= 1, got 2.5"),
        (dict(smoothing=0.0), "smoothing must be a finite number > 0, got 0.0"),
        (dict(awp_gamma=-1.0), "awp_gamma must be a finite number >= 0, got -1.0"),
        (dict(distill_weight=0.1), "distill_weight=0.1 and teacher_prompt=None disagree"),
        (dict(distill_weight=0.1, teacher_prompt=torch.zeros(5)), r"teacher_prompt must have shape \(intrinsic_dim,\) = \(12,\), got \(5,\)"),
        (dict(initial_prompt_scale=-0.5), "initial_prompt_scale must be a finite number >= 0, got -0.5"),
        (dict(initial_prompt=torch.zeros(2, 32)), r"initial_prompt must have shape \(num_prompt_tokens, hidden_size\) = \(3, 32\), got \(2, 32\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            tuner_for(scorer, private, **kwargs)
    with pytest.raises(ValueError, match="scorer must be a PromptScorer"):
        BlackBoxPromptTuner("http://127.0.0.1:1")
    with pytest.raises(ValueError, match="build the datamodule with keep_text=True"):
        quiet_trainer(tmp_path, max_steps=1).fit(tuner_for(scorer, private), datamodule=TextClassificationDataModule(
            "csv", data_files=reviews, tokenizer=path, batch_size=8))


# ---------------------------------------------------------------------------------------------------- the mechanism
def test_mechanism_noise_has_std_sigma_c_over_b_and_empty_batches_are_noise_only_releases():
    sigma, clip, batch = 1.3, 0.7, 20
    mechanism = ZerothOrderMechanism(PrivacyConfig(noise_multiplier=sigma, target_epsilon=None, max_grad_norm=clip, seed=3))
    mechanism.plan(dataset_size=1000, expected_batch_size=batch, planned_steps=10)
    released = mechanism.release(torch.zeros(0, 20000))  # an empty Poisson batch: 20000 noise draws
    assert released.std().item() == pytest.approx(sigma * clip / batch, rel=0.03)
    assert abs(released.mean().item()) < 4 * sigma * clip / batch / math.sqrt(20000)
    assert mechanism.updates == 1 and mechanism.history == [(sigma, batch / 1000, 1)]


# ---------------------------------------------------------------------------------------------------- the update
@pytest.mark.parametrize("private", [True, False])
@pytest.mark.parametrize("distill", [False, True])
def test_update_equals_a_hand_computation(private, distill, scorers, tiny_model_dir, reviews, tmp_path):
    """Noise 0: per-example two-point differences from plain forwards, clipped by hand (DP) or averaged
    unclipped (non-private), mapped back through the directions, plus the autograd gradient of the
    distillation term; one SGD step with lr 1."""
    clip, mu = 0.008, 0.5
    privacy = PrivacyConfig(noise_multiplier=0.0, target_epsilon=None, max_grad_norm=clip) if private \
        else PrivacyConfig(enabled=False)
    teacher = torch.linspace(-1.0, 1.0, 12)
    extra = dict(teacher_prompt=teacher, distill_weight=0.3) if distill else {}
    tuner = tuner_for(scorers("gpt2"), privacy, smoothing=mu, **extra)
    record = RecordBatches()
    quiet_trainer(tmp_path, max_steps=1, callbacks=[record]).fit(tuner, datamodule=data_for(reviews, tiny_model_dir("gpt2")))

    batch, z = record.batches[0], record.z_before[0]
    labels = batch["labels"]
    assert labels.shape[0] > 0
    directions = torch.randn(3, 12, generator=torch.Generator().manual_seed(1))  # seed 0, step 0
    torch.testing.assert_close(tuner.directions_for(0), directions)
    project = lambda point: tuner.initial_prompt + (tuner.projection @ point).view(3, -1)  # noqa: E731
    rows = []
    for text, label in zip(batch["text"], labels):
        row = []
        for u in directions:
            plus = F.cross_entropy(reference_logits(tiny_model_dir("gpt2"), project(z + mu * u), text)[None], label[None])
            minus = F.cross_entropy(reference_logits(tiny_model_dir("gpt2"), project(z - mu * u), text)[None], label[None])
            row.append((plus - minus) / (2 * mu))
        rows.append(torch.stack(row))
    differences = torch.stack(rows)
    if private:
        norms = differences.norm(dim=1)
        assert (norms > clip).any() and (norms < clip).any()  # both sides of the clipping bound are exercised
        clipped = [d * min(1.0, clip / (d.norm().item() + 1e-6)) for d in differences]
        released = torch.stack(clipped).sum(0) / 8  # the expected batch size, not the drawn one
    else:
        released = differences.mean(0)
    estimate = sum(released[k] * directions[k] for k in range(3)) / 3
    expected_gradient = estimate
    if distill:
        z_leaf = z.clone().requires_grad_(True)
        (0.3 * (z_leaf - teacher).norm()).backward()
        expected_gradient = estimate + z_leaf.grad
        if private:
            assert [(e.component, e.status) for e in tuner.ledger.entries] == [("prompt distillation", "public")]
    torch.testing.assert_close(tuner.released_estimate, estimate, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(tuner.z.detach(), z - expected_gradient, atol=1e-6, rtol=1e-4)


def test_awp_evaluates_along_the_previous_released_estimate_only(scorers, tiny_model_dir, reviews, tmp_path):
    """With noise, step t's differences are taken around z + gamma ||z|| g / ||g`` where g is the
    estimate released at step t - 1 (no perturbation before the first release); z itself is updated."""
    gamma, mu = 0.5, 0.5
    recording = RecordingScorer(scorers("gpt2"))
    tuner = tuner_for(recording, PrivacyConfig(noise_multiplier=2.0, target_epsilon=None, max_grad_norm=0.05, seed=1),
                      awp_gamma=gamma, smoothing=mu)
    record = RecordBatches()
    quiet_trainer(tmp_path, max_steps=4, callbacks=[record]).fit(tuner, datamodule=data_for(reviews, tiny_model_dir("gpt2")))

    assert len(recording.prompts) == 4  # nonempty batches, one scoring request each
    for step, prompts in enumerate(recording.prompts):
        z = record.z_before[step]
        if step == 0:
            expected = z
        else:
            g = record.released[step - 1]
            expected = z + gamma * z.norm() * g / g.norm()
        # The 2q prompts are p0 + A(point +- mu u_k): their mean is p0 + A point.
        centre = prompts.mean(0)
        torch.testing.assert_close(centre, tuner.initial_prompt + (tuner.projection @ expected).view(3, -1),
                                   atol=1e-6, rtol=1e-4)
    assert tuner.engine.history == [(2.0, 8 / 48, 4)]  # no extra release: AWP is post-processing
    assert [(e.component, e.status) for e in tuner.ledger.entries] == [("prompt-space AWP", "accounted")]
    # The update is of the unperturbed z: z_{t+1} = z_t - lr * released estimate (lr 1, no distillation).
    torch.testing.assert_close(record.z_before[3] - record.released[3], tuner.z.detach())


# ---------------------------------------------------------------------------------------------------- privacy
def test_reported_epsilon_equals_a_fresh_opacus_accountant_and_report_is_written(scorers, tiny_model_dir, reviews, tmp_path):
    target = 4.0
    tuner = tuner_for(scorers("llama"), PrivacyConfig(target_epsilon=target, secure_mode=True))
    trainer = quiet_trainer(tmp_path, max_epochs=2)
    trainer.fit(tuner, datamodule=data_for(reviews, tiny_model_dir("llama")))
    engine = tuner.engine
    assert engine.updates == tuner.steps_taken == 2 * 6  # every planned step ran, empty Poisson batches included
    fresh = PRVAccountant()
    for _ in range(12):
        fresh.step(noise_multiplier=engine.noise_multiplier, sample_rate=8 / 48)
    expected = fresh.get_epsilon(delta=48 ** -1.1)
    report = json.loads((tmp_path / "privacy_report.json").read_text())
    assert report["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert float(trainer.callback_metrics["epsilon"]) == pytest.approx(expected, rel=1e-6)  # the progress bar's
    assert target * 0.97 < report["epsilon"] <= target  # calibrated to the target
    assert report["formal_guarantee"] is True and report["grad_sample_mode"] == "zeroth_order"
    assert report["noise_generator"] == "os.urandom (CSPRNG)" and trainer.train_dataloader.secure
    assert report["callbacks"]["BlackBoxPromptTuner"]["num_directions"] == 3
    assert "receives the private texts" in report["callbacks"]["BlackBoxPromptTuner"]["trust"]


def test_empty_poisson_batches_are_noise_only_steps(scorers, tiny_model_dir, reviews, tmp_path):
    """Expected batch 1 of 48: about a third of the draws are empty; each still releases noise and steps."""
    recording = RecordingScorer(scorers("gpt2"))
    tuner = tuner_for(recording, PrivacyConfig(noise_multiplier=1.0, target_epsilon=None, accountant="rdp"))
    record = RecordBatches()
    quiet_trainer(tmp_path, max_epochs=1, callbacks=[record]).fit(tuner, datamodule=data_for(reviews, tiny_model_dir("gpt2"),
                                                                                           batch_size=1))
    sizes = [batch["labels"].shape[0] for batch in record.batches]
    assert len(sizes) == 48 and sizes.count(0) >= 5
    assert tuner.engine.updates == tuner.steps_taken == 48
    assert len(recording.prompts) == 48 - sizes.count(0)  # the scorer is not called for an empty batch
    for step, size in enumerate(sizes):
        if size == 0:  # a pure-noise estimate, still applied
            assert record.released[step].norm() > 0
            after = record.z_before[step + 1] if step + 1 < 48 else tuner.z.detach()
            torch.testing.assert_close(after, record.z_before[step] - record.released[step])


def test_nonprivate_baseline_reports_no_guarantee(scorers, tiny_model_dir, reviews, tmp_path):
    tuner = tuner_for(scorers("gpt2"), PrivacyConfig(enabled=False))
    trainer = quiet_trainer(tmp_path, max_steps=2)
    trainer.fit(tuner, datamodule=data_for(reviews, tiny_model_dir("gpt2")))
    trainer.test(tuner, datamodule=data_for(reviews, tiny_model_dir("gpt2")))
    report = json.loads((tmp_path / "privacy_report.json").read_text())
    assert report["epsilon"] is None and report["formal_guarantee"] is False
    assert "test_acc" in report["metrics"]


def test_a_second_run_in_the_same_folder_gets_its_own_report(scorers, tiny_model_dir, reviews, tmp_path):
    """logger=False: both runs report under default_root_dir; the second must not overwrite the first."""
    tuners = []
    for _ in range(2):
        tuner = tuner_for(scorers("gpt2"), PrivacyConfig(enabled=False))
        trainer = quiet_trainer(tmp_path, max_steps=1)
        trainer.fit(tuner, datamodule=data_for(reviews, tiny_model_dir("gpt2")))
        trainer.test(tuner, datamodule=data_for(reviews, tiny_model_dir("gpt2")))
        tuners.append(tuner)
    assert [t.report_dir for t in tuners] == [tmp_path, tmp_path / "privacy_reports" / "version_0"]
    assert sorted(tmp_path.rglob("privacy_report.json")) == sorted(t.report_dir / "privacy_report.json" for t in tuners)
    for tuner in tuners:
        report = json.loads((tuner.report_dir / "privacy_report.json").read_text())
        assert report["run_id"] == tuner.run_id and "test_acc" in report["metrics"]


def test_a_zero_shot_test_before_fit_reports_nothing_spent(scorers, tiny_model_dir, reviews, tmp_path):
    tuner = tuner_for(scorers("gpt2"), PrivacyConfig(target_epsilon=8.0))
    quiet_trainer(tmp_path).test(tuner, datamodule=data_for(reviews, tiny_model_dir("gpt2")))
    report = json.loads((tmp_path / "privacy_report.json").read_text())
    assert report["epsilon"] == 0.0 and report["steps"] == 0 and report["accountant_history"] == []
    assert "test_acc" in report["metrics"]
    assert "Nothing has been trained on the private data yet" in (tmp_path / "privacy_report.md").read_text()


def make_private(scorer):
    return tuner_for(scorer, PrivacyConfig(target_epsilon=3.0, accountant="rdp", seed=7), awp_gamma=0.1)


def test_resume_keeps_the_spend_the_prompt_and_the_schedule(scorers, tiny_model_dir, reviews, tmp_path):
    scorer, path = scorers("gpt2"), tiny_model_dir("gpt2")
    data = partial(data_for, reviews, path, batch_size=16)  # 3 Poisson batches per epoch
    whole = make_private(scorer)
    quiet_trainer(tmp_path / "whole", max_epochs=2).fit(whole, datamodule=data())
    ckpt = tmp_path / "interrupted.ckpt"
    first = make_private(scorer)
    interrupted = quiet_trainer(tmp_path / "a", max_epochs=2, callbacks=[StopAfter(4, ckpt)])
    interrupted.fit(first, datamodule=data())
    assert first.engine.updates == 4  # stopped inside the second epoch
    assert type(interrupted.strategy.checkpoint_io) is AtomicCheckpointIO, "a kill mid-save must not lose the spend"
    resumed = make_private(scorer)
    quiet_trainer(tmp_path / "b", max_epochs=2).fit(resumed, datamodule=data(), ckpt_path=ckpt)

    assert resumed.engine.updates == whole.engine.updates == 6
    assert resumed.engine.history == whole.engine.history
    assert resumed.privacy_report()["epsilon"] == pytest.approx(whole.privacy_report()["epsilon"], rel=1e-12)
    # Same Poisson draws, directions, AWP direction and noise stream: the resumed run is the whole run.
    torch.testing.assert_close(resumed.z, whole.z)
    # The projection is regenerated from the seed, not stored.
    assert "projection" not in torch.load(ckpt, weights_only=False)["state_dict"]
    torch.testing.assert_close(resumed.projection, whole.projection)


def test_resume_without_privacy_state_is_refused(scorers, tiny_model_dir, reviews, tmp_path):
    scorer, path = scorers("gpt2"), tiny_model_dir("gpt2")
    public = tuner_for(scorer, PrivacyConfig(enabled=False))
    trainer = quiet_trainer(tmp_path, max_steps=2)
    trainer.fit(public, datamodule=data_for(reviews, path))
    ckpt = tmp_path / "public.ckpt"
    trainer.save_checkpoint(ckpt)
    with pytest.raises(ValueError, match="holds no privacy state"):
        quiet_trainer(tmp_path, max_epochs=2).fit(make_private(scorer), datamodule=data_for(reviews, path), ckpt_path=ckpt)


def test_projection_follows_bbt_scaling_and_the_seed(scorers):
    scorer = scorers("llama")
    big = BlackBoxPromptTuner(scorer, num_prompt_tokens=20, intrinsic_dim=400, projection_scale=2.0, seed=5)
    expected_std = 2.0 * scorer.info.embedding_std / math.sqrt(400)
    assert big.projection.std().item() == pytest.approx(expected_std, rel=0.02)
    again = BlackBoxPromptTuner(scorer, num_prompt_tokens=20, intrinsic_dim=400, projection_scale=2.0, seed=5)
    assert torch.equal(big.projection, again.projection)
    other = BlackBoxPromptTuner(scorer, num_prompt_tokens=20, intrinsic_dim=400, projection_scale=2.0, seed=6)
    assert not torch.equal(big.projection, other.projection)
    # p0: a seeded Gaussian on the embeddings' scale (kept in checkpoints), or zeros at scale 0.
    assert big.initial_prompt.std().item() == pytest.approx(scorer.info.embedding_std, rel=0.1)
    assert torch.equal(big.initial_prompt, again.initial_prompt)
    assert not torch.equal(big.initial_prompt, other.initial_prompt)
    assert "initial_prompt" in big.state_dict()
    zero = BlackBoxPromptTuner(scorer, num_prompt_tokens=20, intrinsic_dim=400, initial_prompt_scale=0.0)
    assert not zero.initial_prompt.any()
    # z = 0 is the untuned prompt p0: the model's zero-shot scores.
    texts = ["a good film"]
    torch.testing.assert_close(big(texts), scorer.label_logits(big.initial_prompt[None], texts)[0])
