"""Step time and memory of DP prefix tuning against the non-private limit and the PEFT + Opacus peer.

    python benchmarks/suite.py --suites main smollm2 growth virtual reparam --out benchmarks/results.json
    python benchmarks/suite.py --render benchmarks/results.json     # the tables of BENCHMARKS.md

Every configuration runs in a fresh subprocess (so peak memory is its own) for ``warmup + steps``
training steps on synthetic token batches of fixed size, and reports the median step time and the
memory of the training steps: ``peak_mib`` (largest resident set size sampled every 2 ms during the
measured steps) and ``step_mib`` (that peak minus the resident size before them: what a step adds on
top of the loaded model). Configurations:

- ``nonprivate``: the same prefix model trained without DP (the limit);
- ``peer``: Hugging Face PEFT prefix tuning + Opacus ``make_private`` in a plain PyTorch loop (the
  wiring of dp-transformers), same backbone, batch, length and prefix length, dropout off as ours;
- ``dp``: ours (``PrefixTunedClassifier`` + Lightning), with a grad-sample mode, optional callbacks
  (``awp_previous``, ``awp_fresh``, ``distill``) and an optional reparametrised prefix.

Suites: ``main`` (each configuration on tiny GPT-2 and the bundled MiniLM), ``smollm2`` (limit, peer
and DP hooks on the bundled SmolLM2-135M, 6 steps: about 5 s each here), ``growth`` (batch, length,
prefix length on MiniLM), ``virtual`` (logical batch 1024 in physical chunks of 32 vs. 32),
``reparam`` (reparametrised prefix at logical batch 256, hooks vs. ghost vs. auto), ``repeat`` (limit,
peer and ours interleaved three times on MiniLM, to separate a small gap from run-to-run noise),
``prompt`` (the default recipe's step: SmolLM2 reading label words, limit, peer (PEFT prefix tuning of
the causal LM + Opacus, the same label-word loss) and ours interleaved twice, length 40), ``profile`` (where
a MiniLM step spends its time: limit, peer and ours interleaved three times, then each under cProfile, the self
CPU time of each package's Python and of the C++ operators, per step), ``chunks`` (the length-sorted, trimmed
physical chunks against chunks cut in batch order, on real batches of the default recipe: movie_reviews prompts,
logical batch 128 in chunks of 32, SmolLM2 reading label words; interleaved twice).

``--clock cpu`` times steps by the process's CPU time instead of the wall clock: on a machine shared with
other jobs it measures the work a step does rather than the share of the cores it got.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

PAGE = os.sysconf("SC_PAGE_SIZE")
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
#: Where profiled code lives, most specific first (``pflat_lightning`` before ``lightning``'s match).
PACKAGES = ("pflat_lightning", "lightning", "opacus", "peft", "transformers", "torch")


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


class MemorySampler:
    """Largest resident set size between start() and stop(), sampled every 2 ms in a thread."""

    def __init__(self) -> None:
        self.peak, self._running, self._thread = 0.0, False, None

    def start(self) -> None:
        self.baseline = self.peak = rss_mib()
        self._running = True
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while self._running:
            self.peak = max(self.peak, rss_mib())
            time.sleep(0.002)

    def stop(self) -> None:
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, rss_mib())


class StepTimer:
    """Times the measured steps on the spec's clock and, for a profiled spec, runs cProfile over exactly them."""

    def __init__(self, spec: dict) -> None:
        self.clock, self.times = CLOCKS[spec["clock"]], []
        self.profiler = cProfile.Profile(time.process_time) if spec["profile"] else None

    def start(self, measured: bool) -> None:
        self.measured = measured
        if measured and self.profiler:
            self.profiler.enable()
        self.started = self.clock()

    def stop(self) -> None:
        elapsed = self.clock() - self.started
        if self.measured and self.profiler:
            self.profiler.disable()
        self.times.append(elapsed)

    def result(self, warmup: int) -> dict:
        measured = self.times[warmup:]
        # The median leaves out the occasional step that also recomputes epsilon; the mean includes it.
        result = {"median_step_s": statistics.median(measured), "mean_step_s": statistics.fmean(measured)}
        if self.profiler:
            result["breakdown"] = breakdown(pstats.Stats(self.profiler), len(measured))
        return result


def owner(filename: str, function: str) -> str:
    """The package a profiled function belongs to; C functions count as torch operators or builtins."""
    if filename == "~":
        return "torch C++ operators" if "torch" in function else "Python builtins"
    for package in PACKAGES:
        if f"/{package}/" in filename:
            return package
    return "other Python"


def breakdown(stats: pstats.Stats, steps: int) -> dict:
    """Self CPU time per step (ms) of each package, and the ten costliest Python functions outside torch."""
    packages, functions = {}, []
    for (filename, line, function), (_, _, self_time, _, _) in stats.stats.items():
        where = owner(filename, function)
        packages[where] = packages.get(where, 0.0) + self_time
        if where in PACKAGES[:-1]:
            functions.append((self_time, f"{where}: {Path(filename).name}:{line} {function}"))
    per_step = lambda t: round(t / steps * 1000, 2)  # noqa: E731
    return {"packages_ms": {k: per_step(v) for k, v in sorted(packages.items(), key=lambda kv: -kv[1])},
            "top_ms": {name: per_step(t) for t, name in sorted(functions, reverse=True)[:10]}}


class Tokens(Dataset):
    def __init__(self, size: int, length: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(2000, 5000, (size, length), generator=g)
        self.labels = torch.randint(0, 2, (size,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.ids[i], self.labels[i]


def collate(items):
    """Token batches with full attention; an empty (Poisson) batch keeps the keys."""
    if not items:
        return {"input_ids": torch.zeros(0, 1, dtype=torch.long), "attention_mask": torch.zeros(0, 1, dtype=torch.long),
                "labels": torch.zeros(0, dtype=torch.long)}
    ids, labels = zip(*items)
    ids = torch.stack(ids)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.stack(labels)}


# ---------------------------------------------------------------------------------------------- one run
def run_ours(spec: dict) -> dict:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback

    from pflat_lightning import PrefixConfig, PrefixTunedClassifier, PrivacyConfig
    from pflat_lightning.callbacks import AdversarialWeightPerturbation, TeacherDistillation

    private = spec["kind"] == "dp"
    privacy = (PrivacyConfig(noise_multiplier=1.0, target_epsilon=None, poisson_sampling=False,
                             grad_sample_mode=spec["mode"]) if private else PrivacyConfig(enabled=False))
    physical = spec["physical"] or spec["batch"]
    model = PrefixTunedClassifier(spec["backbone"], 2, head=spec["head"],
                                  label_words=LABEL_WORDS if spec["head"] == "label_words" else None,
                                  prefix=PrefixConfig(num_virtual_tokens=spec["prefix"], reparam_hidden=spec["reparam"]),
                                  privacy=privacy, max_physical_batch_size=physical,
                                  optimizer=partial(torch.optim.AdamW, lr=1e-3))
    callbacks = []
    with tempfile.TemporaryDirectory() as folder:
        for name in spec["callbacks"]:
            if name == "awp_previous":
                callbacks.append(AdversarialWeightPerturbation(gamma=0.01, until_fraction=1.0))
            elif name == "awp_fresh":
                callbacks.append(AdversarialWeightPerturbation(gamma=0.01, direction="fresh_private", until_fraction=1.0))
            elif name == "distill":
                ckpt = Path(folder, "teacher.ckpt")
                torch.save({"state_dict": {f"model.{k}": v for k, v in model.model.state_dict().items()}}, ckpt)
                callbacks.append(TeacherDistillation("checkpoint", checkpoint_path=str(ckpt)))
        sampler, timer, grad_samples = MemorySampler(), StepTimer(spec), []

        class Measure(Callback):
            def on_train_batch_start(self, trainer, *args):
                if trainer.global_step == spec["warmup"]:
                    sampler.start()
                timer.start(measured=trainer.global_step >= spec["warmup"])

            def on_train_batch_end(self, *args):
                timer.stop()

            def on_before_optimizer_step(self, trainer, pl_module, optimizer):
                # Per-example gradients materialised for clipping (hooks); ghost clipping keeps none.
                held = sum(p.grad_sample.nbytes for p in pl_module.parameters()
                           if isinstance(getattr(p, "grad_sample", None), torch.Tensor))
                grad_samples.append(held / 2**20)

        total = spec["warmup"] + spec["steps"]
        if spec["data"] == "movie_reviews":
            loader = prompt_batches(spec)
        else:
            loader = DataLoader(Tokens(spec["batch"] * total, spec["length"]), batch_size=spec["batch"],
                                collate_fn=collate)
        if spec["chunking"] == "plain":
            import pflat_lightning.module

            pflat_lightning.module.physical_batches = plain_chunks
        trainer = pl.Trainer(max_steps=total, default_root_dir=folder, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                             precision=spec["precision"], callbacks=[Measure(), *callbacks])  # the timer starts before the callbacks act
        trainer.fit(model, train_dataloaders=loader)
        sampler.stop()
    result = timer.result(spec["warmup"])
    if private:
        result["grad_sample_mode_used"] = model.engine.grad_sample_mode
        result["grad_sample_mib"] = round(max(grad_samples, default=0.0), 1)
    return {**result, **memory(sampler)}


def prompt_batches(spec: dict) -> DataLoader:
    """Logical batches of the default recipe's movie_reviews prompts (real, variable lengths, padded to each
    batch's longest), tokenised for the spec's backbone."""
    from pflat_lightning.datamodules import TextClassificationDataModule

    data = TextClassificationDataModule(source="movie_reviews", template=PROMPT_TEMPLATE, tokenizer=spec["backbone"],
                                        max_length=96, batch_size=spec["batch"], max_train_examples=2000, seed=0)
    data.setup("fit")
    return data.train_dataloader()


def plain_chunks(batch: dict, size: int):
    """Physical chunks in the batch's order, each padded to the logical batch's longest example: the length-sorted,
    trimmed chunks of ``pflat_lightning.protocol.physical_batches`` switched off."""
    count = len(batch["attention_mask"])
    for start in range(0, count, size):
        yield {key: value[start:start + size] for key, value in batch.items()}


def run_peer(spec: dict) -> dict:
    from opacus import PrivacyEngine
    from peft import PrefixTuningConfig, TaskType, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from pflat_lightning.bundled import resolve_model

    path = resolve_model(spec["backbone"])
    label_words = spec["head"] == "label_words"
    config = AutoConfig.from_pretrained(path, num_labels=2)
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                "attention_dropout"):
        if hasattr(config, key):
            setattr(config, key, 0.0)
    if config.pad_token_id is None:
        config.pad_token_id = 0
    auto = AutoModelForCausalLM if label_words else AutoModelForSequenceClassification
    model = auto.from_pretrained(path, config=config)
    peft_config = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM if label_words else TaskType.SEQ_CLS,
                                     num_virtual_tokens=spec["prefix"], prefix_projection=spec["reparam"] is not None,
                                     encoder_hidden_size=spec["reparam"] or config.hidden_size)
    model = get_peft_model(model, peft_config)
    model.train()
    if label_words:  # LM-BFF: the LM head's logits of one word per class at the last position
        tokenizer = AutoTokenizer.from_pretrained(path)
        word_ids = torch.tensor([tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in LABEL_WORDS])

        def loss_of(batch):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return torch.nn.functional.cross_entropy(logits[:, -1, word_ids], batch["labels"])
    else:
        def loss_of(batch):
            return model(**batch).loss
    total = spec["warmup"] + spec["steps"]
    loader = DataLoader(Tokens(spec["batch"] * total, spec["length"]), batch_size=spec["batch"], collate_fn=collate)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model, optimizer, loader = PrivacyEngine().make_private(module=model, optimizer=optimizer, data_loader=loader,
                                                            noise_multiplier=1.0, max_grad_norm=1.0,
                                                            poisson_sampling=False)
    sampler, timer = MemorySampler(), StepTimer(spec)
    for step, batch in enumerate(loader):
        if step == spec["warmup"]:
            sampler.start()
        timer.start(measured=step >= spec["warmup"])
        optimizer.zero_grad(set_to_none=True)
        loss_of(batch).backward()
        optimizer.step()
        timer.stop()
    sampler.stop()
    return {**timer.result(spec["warmup"]), **memory(sampler)}


def memory(sampler: MemorySampler) -> dict:
    return {"peak_mib": round(sampler.peak, 1), "step_mib": round(sampler.peak - sampler.baseline, 1)}


# ---------------------------------------------------------------------------------------------- suites
DEFAULTS = dict(kind="dp", mode="hooks", callbacks=[], reparam=None, batch=32, physical=None, length=64, prefix=10,
                steps=10, warmup=2, head="linear", precision="32-true", clock="wall", profile=False, data="tokens",
                chunking="sorted")
#: The ``prompt`` suite's label words (LM-BFF, read at the last position by the causal LM's own head), and the
#: default recipe's template (the ``chunks`` suite's real batches).
LABEL_WORDS = ["awful", "wonderful"]
PROMPT_TEMPLATE = "{text} In summary, this film is {mask}"


def spec(name: str, **kwargs) -> dict:
    return {"name": name, **DEFAULTS, **kwargs}


def main_suite(backbone: str) -> list:
    b = dict(backbone=backbone)
    return [
        spec("non-private (limit)", kind="nonprivate", **b),
        spec("PEFT + Opacus (peer)", kind="peer", **b),
        spec("DP hooks", **b),
        spec("DP ghost", mode="ghost", **b),
        spec("DP + AWP previous_private", callbacks=["awp_previous"], **b),
        spec("DP + AWP fresh_private", callbacks=["awp_fresh"], **b),
        spec("DP + distillation", callbacks=["distill"], **b),
        spec("non-private, reparam. prefix", kind="nonprivate", reparam=512, **b),
        spec("PEFT + Opacus, reparam. prefix", kind="peer", reparam=512, **b),
        spec("DP reparam. prefix, hooks", reparam=512, **b),
        spec("DP reparam. prefix, ghost", reparam=512, mode="ghost", **b),
    ]


def suites(args, tiny: str) -> dict:
    minilm = dict(backbone="bundled-minilm")
    return {
        "main": main_suite(tiny) + main_suite("bundled-minilm"),
        "growth": [spec(f"{kind} batch {n}", kind=kind, batch=n, **minilm) for n in (8, 64) for kind in ("nonprivate", "dp")]
        + [spec(f"{kind} length {n}", kind=kind, length=n, **minilm) for n in (32, 128) for kind in ("nonprivate", "dp")]
        + [spec(f"{kind} prefix {n}", kind=kind, prefix=n, **minilm) for n in (5, 20) for kind in ("nonprivate", "dp")],
        "virtual": [spec("DP logical 32", steps=8, **minilm),
                    spec("DP logical 1024 = 32 x 32 virtual", batch=1024, physical=32, steps=2, warmup=1, **minilm)],
        "repeat": [spec(f"round {k}: {name}", kind=kind, **minilm) for k in (1, 2, 3)
                   for name, kind in (("non-private", "nonprivate"), ("peer", "peer"), ("DP hooks", "dp"))],
        "profile": [spec(f"round {k}: {name}", kind=kind, **minilm) for k in (1, 2, 3)
                    for name, kind in (("non-private", "nonprivate"), ("peer", "peer"), ("DP hooks", "dp"))]
        + [spec(f"profiled: {name}", kind=kind, profile=True, **minilm)
           for name, kind in (("non-private", "nonprivate"), ("peer", "peer"), ("DP hooks", "dp"))],
        "prompt": [spec(f"round {k}: {name}", kind=kind, backbone="bundled-smollm2", head="label_words", length=40,
                        steps=6, warmup=1) for k in (1, 2)
                   for name, kind in (("non-private", "nonprivate"), ("peer", "peer"), ("DP hooks", "dp"))],
        "precision": [spec(f"round {k}: {name}, {precision}", kind=kind, precision=precision,
                           backbone="bundled-smollm2", head="label_words", length=40, steps=4, warmup=1)
                      for k in (1, 2) for name, kind in (("non-private", "nonprivate"), ("DP hooks", "dp"))
                      for precision in ("32-true", "bf16-mixed")],
        "chunks": [spec(f"round {k}: DP hooks, {chunking} chunks", chunking=chunking, data="movie_reviews",
                        backbone="bundled-smollm2", head="label_words", batch=128, physical=32, steps=3, warmup=1)
                   for k in (1, 2) for chunking in ("plain", "sorted")],
        "smollm2": [spec(name, kind=kind, backbone="bundled-smollm2", steps=6, warmup=1)
                    for name, kind in (("non-private (limit)", "nonprivate"), ("PEFT + Opacus (peer)", "peer"),
                                       ("DP hooks", "dp"))],
        "reparam": [spec(f"reparam. prefix, logical 256, {kind}" + (f" {mode}" if kind == "dp" else ""), kind=kind,
                         mode=mode, reparam=512, batch=256,
                         physical=256, steps=3, warmup=1, **minilm)
                    for kind, mode in (("nonprivate", "hooks"), ("dp", "hooks"), ("dp", "ghost"), ("dp", "auto"))],
    }


def tiny_gpt2(folder: Path) -> str:
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from pflat_lightning.bundled import resolve_model

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=30522, n_embd=64, n_layer=2, n_head=4, n_positions=256, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_model("bundled-minilm")).save_pretrained(folder)
    return str(folder)


def measure(one: dict, suite: str) -> dict:
    process = subprocess.run([sys.executable, __file__, "--one", json.dumps(one)], capture_output=True, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
    if process.returncode != 0 or not lines:
        return {**one, "suite": suite, "error": process.stderr.strip().splitlines()[-1:]}
    return {**one, "suite": suite, **json.loads(lines[-1][len("RESULT "):])}


def label(result: dict) -> str:
    return result["name"] + (" (CPU time)" if result.get("clock") == "cpu" else "")


def render(results: list) -> str:
    """Markdown tables of a results list (what BENCHMARKS.md shows)."""
    out = []
    ok = [r for r in results if "error" not in r]
    for suite, backbone in dict.fromkeys((r["suite"], r["backbone"]) for r in ok if r["suite"] in ("main", "smollm2")):
        rows = {r["name"]: r for r in ok if r["suite"] == suite and r["backbone"] == backbone}
        out += [f"### {backbone}: batch 32, length 64, 10 virtual tokens", "",
                "| configuration | step (s) | / limit | / peer | peak MiB | step MiB | step MiB / limit's |",
                "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, r in rows.items():
            reparam = "reparam" in name
            limit = rows["non-private, reparam. prefix" if reparam else "non-private (limit)"]
            peer = rows.get("PEFT + Opacus, reparam. prefix" if reparam else "PEFT + Opacus (peer)")
            time_peer = f"{r['median_step_s'] / peer['median_step_s']:.2f}" if peer else "n/a"
            out.append(f"| {label(r)} | {r['median_step_s']:.3f} | {r['median_step_s'] / limit['median_step_s']:.2f} | "
                       f"{time_peer} | {r['peak_mib']:.0f} | {r['step_mib']:.0f} | "
                       f"{r['step_mib'] / max(limit['step_mib'], 1.0):.2f} |")
        out.append("")
    for suite, title in (("growth", "Growth (bundled MiniLM; one parameter changed from batch 32, length 64, prefix 10)"),
                         ("virtual", "Virtual steps (bundled MiniLM, DP hooks)"),
                         ("repeat", "Limit, peer and ours interleaved, three rounds (bundled MiniLM, batch 32, length 64)"),
                         ("prompt", "Prompt-based SmolLM2 (label words at the last position; limit, peer and ours "
                                    "interleaved, two rounds; batch 32, length 40)"),
                         ("precision", "Prompt-based SmolLM2, fp32 against bf16 autocast (Trainer precision "
                                       "'bf16-mixed'), interleaved, two rounds; batch 32, length 40"),
                         ("reparam", "Reparametrised prefix (MLP, hidden 512) at logical = physical batch 256 "
                                     "(MiniLM)"),
                         ("chunks", "Real movie_reviews prompts (SmolLM2 label words, logical batch 128 in physical "
                                    "chunks of 32): chunks cut in batch order vs sorted by length and trimmed"),
                         ("profile", "Limit, peer and ours interleaved, three rounds, then each under cProfile "
                                     "(bundled MiniLM, batch 32, length 64)")):
        rows = [r for r in ok if r["suite"] == suite]
        if not rows:
            continue
        out += [f"### {title}", "",
                "| configuration | step (s) | per example | peak MiB | step MiB | per-example gradients MiB | mode used |",
                "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            out.append(f"| {label(r)} | {r['median_step_s']:.3f} | {r['median_step_s'] / r['batch'] * 1000:.2f} ms | "
                       f"{r['peak_mib']:.0f} | {r['step_mib']:.0f} | {r.get('grad_sample_mib', '-')} | "
                       f"{r.get('grad_sample_mode_used', '-')} |")
        out.append("")
    profiled = [r for r in ok if r["suite"] == "profile" and "breakdown" in r]
    if profiled:
        out += render_profile(profiled)
    failed = [r for r in results if "error" in r]
    if failed:
        out += ["Failed: " + "; ".join(f"{r['backbone']} {r['name']}: {r['error']}" for r in failed), ""]
    return "\n".join(out)


def render_profile(rows: list) -> list:
    """Self CPU ms per step by package, one column per configuration, then each one's costliest functions."""
    names = [r["name"].removeprefix("profiled: ") for r in rows]
    packages = list(dict.fromkeys(k for r in rows for k in r["breakdown"]["packages_ms"]))
    out = ["### Where a step's CPU time goes (bundled MiniLM, batch 32, length 64; cProfile, self time per step)", "",
           "| ms per step | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(rows)]
    for package in packages:
        cells = (f"{r['breakdown']['packages_ms'].get(package, 0.0):.1f}" for r in rows)
        out.append(f"| {package} | " + " | ".join(cells) + " |")
    out.append("| total (profiled step, " + rows[0]["clock"] + " clock) | "
               + " | ".join(f"{r['median_step_s'] * 1000:.0f}" for r in rows) + " |")
    for name, r in zip(names, rows):
        out += ["", f"Costliest Python functions outside torch, {name} (ms per step):", ""]
        out += [f"- {ms:.2f} {function}" for function, ms in r["breakdown"]["top_ms"].items()]
    return out + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suites", nargs="+", default=["main", "smollm2", "growth", "virtual", "reparam"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results.json"))
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="time steps by the wall clock or by the process's CPU time (for a shared machine)")
    parser.add_argument("--render", type=Path, help="print the markdown tables of a results file and exit")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.render:
        print(render(json.loads(args.render.read_text())["results"]))
        return
    if args.one:
        one = json.loads(args.one)
        print("RESULT " + json.dumps(run_peer(one) if one["kind"] == "peer" else run_ours(one)), flush=True)
        return
    # Results of suites not run now are kept, so suites can be measured separately.
    previous = json.loads(args.out.read_text())["results"] if args.out.exists() else []
    results = [r for r in previous if r["suite"] not in args.suites]
    with tempfile.TemporaryDirectory() as folder:
        tiny = tiny_gpt2(Path(folder, "tiny-gpt2"))
        every = suites(args, tiny)
        for suite in args.suites:
            for one in every[suite]:
                result = measure({**one, "clock": args.clock}, suite)
                if result["backbone"] == tiny:
                    result["backbone"] = "tiny-gpt2"
                results.append(result)
                print(json.dumps({k: result.get(k) for k in ("suite", "backbone", "name", "median_step_s", "peak_mib",
                                                             "step_mib", "error")}), flush=True)
                args.out.write_text(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} cores",
                                                "torch": torch.__version__, "results": results}, indent=2))


if __name__ == "__main__":
    main()
