"""The callbacks' contract: the three flattening callbacks on a LightningModule that is not the library's own."""
import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pflat_lightning.callbacks import AdversarialWeightPerturbation, SharpnessLayerSelection, TeacherDistillation

from helpers import quiet_trainer

WIDTH, LAYERS, VOCAB = 8, 3, 50


class LayerPrefix(nn.Module):
    """A learned (key, value) vector per layer, broadcast over the batch; a pruned layer gives zeros."""

    def __init__(self) -> None:
        super().__init__()
        self.keys = nn.ParameterList(nn.Parameter(0.5 * torch.randn(WIDTH)) for _ in range(LAYERS))
        self.values = nn.ParameterList(nn.Parameter(0.5 * torch.randn(WIDTH)) for _ in range(LAYERS))
        self.mask = [True] * LAYERS

    def forward(self, batch_size: int):
        return [(k.expand(batch_size, -1) * keep, v.expand(batch_size, -1) * keep)
                for k, v, keep in zip(self.keys, self.values, self.mask)]


class PrefixMLP(pl.LightningModule):
    """A plain LightningModule (automatic optimisation, tuple batches): a frozen embedding and MLP, a trainable
    per-layer prefix and head, and exactly the members the contract names."""

    def __init__(self, frozen: nn.ModuleDict = None, lr: float = 0.5) -> None:
        super().__init__()
        if frozen is None:
            frozen = nn.ModuleDict({"embed": nn.Embedding(VOCAB, WIDTH),
                                    "blocks": nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS))})
            frozen.requires_grad_(False)
        self.frozen, self.prefix, self.head, self.lr = frozen, LayerPrefix(), nn.Linear(WIDTH, 2), lr
        self.loss_terms, self.before_optimizers = [], []

    def forward(self, input_ids, prefix=None):
        prefix = self.prefix(input_ids.shape[0]) if prefix is None else prefix
        h = self.frozen["embed"](input_ids).mean(1)
        for block, (k, v) in zip(self.frozen["blocks"], prefix):
            h = torch.tanh(block(h + k)) + v
        return self.head(h)

    # ---- the contract
    def example_losses(self, batch):
        input_ids, labels = batch
        prefix = self.prefix(input_ids.shape[0])
        logits = self(input_ids, prefix)
        losses = F.cross_entropy(logits, labels, reduction="none")
        return losses + sum(term(batch, logits, prefix) for term in self.loss_terms)

    def layer_groups(self):
        return {f"prefix.{i}": [self.prefix.keys[i], self.prefix.values[i]] for i in range(LAYERS)
                if self.prefix.mask[i]}

    def prefix_layer_mask(self):
        return list(self.prefix.mask)

    def set_prefix_layer_mask(self, keep):
        self.prefix.mask = list(keep)
        for i, active in enumerate(keep):
            self.prefix.keys[i].requires_grad_(active)
            self.prefix.values[i].requires_grad_(active)

    def clone_untrained(self):
        return PrefixMLP(self.frozen, self.lr)  # shares the frozen part

    # ---- ordinary Lightning
    def training_step(self, batch, batch_idx):
        return self.example_losses(batch).mean()

    def configure_optimizers(self):
        for work in self.before_optimizers:
            work(self)
        self.before_optimizers.clear()
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def tuples(size, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (size, 5), generator=g)
    return TensorDataset(ids, (ids[:, 0] < VOCAB // 2).long())


class TupleData(pl.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(tuples(64, 0), batch_size=16)

    def val_dataloader(self):
        return DataLoader(tuples(32, 1), batch_size=16)

    def public_dataloader(self, batch_size=None, shuffle=False):
        return DataLoader(tuples(32, 2), batch_size=batch_size or 16, shuffle=shuffle)


def trainable(module):
    return {n: p.detach().clone() for n, p in module.named_parameters() if n.startswith(("prefix", "head"))}


# ---------------------------------------------------------------- AWP
class Spy(Callback):
    """Placed after AWP: the relative size of each layer group's perturbation at every batch start."""

    def __init__(self, start):
        self.start, self.ratios = start, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        params = dict(pl_module.named_parameters())
        for i in range(LAYERS):
            names = [f"prefix.keys.{i}", f"prefix.values.{i}"]
            v = torch.sqrt(sum(((params[n] - self.start[n]) ** 2).sum() for n in names))
            w = torch.sqrt(sum((self.start[n] ** 2).sum() for n in names))
            self.ratios.append(float(v / w))


@pytest.mark.parametrize("direction", ["raw", "previous_private"])
def test_awp_perturbs_and_restores_a_plain_modules_layer_groups(direction, tmp_path):
    """lr=0: every update is zero, so at each batch start the weights are the start plus AWP's perturbation alone."""
    torch.manual_seed(0)
    model = PrefixMLP(lr=0.0)
    start = trainable(model)
    spy = Spy(start)
    awp = AdversarialWeightPerturbation(gamma=0.1, direction=direction, until_fraction=1.0)
    quiet_trainer(tmp_path, max_epochs=1, callbacks=[awp, spy]).fit(model, datamodule=TupleData())
    perturbed = [r for r in spy.ratios if r > 0]
    assert awp.perturbed_steps == (4 if direction == "raw" else 3)  # previous_private: none before the first update
    assert perturbed == pytest.approx([0.1] * LAYERS * awp.perturbed_steps, rel=1e-4)
    assert all(torch.equal(p, start[n]) for n, p in trainable(model).items()), "the perturbation was not restored"


# ---------------------------------------------------------------- layer selection
class EpochSpy(Callback):
    """Placed after the selection: the trainable weights when epoch 1 starts (just after pruning)."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            self.at_selection = trainable(pl_module)


def test_layer_selection_prunes_a_plain_modules_layers(tmp_path):
    torch.manual_seed(0)
    model, spy = PrefixMLP(), EpochSpy()
    selection = SharpnessLayerSelection(keep_layers=2, at_epoch=1, data="validation", num_batches=2)
    quiet_trainer(tmp_path, max_epochs=2, callbacks=[selection, spy]).fit(model, datamodule=TupleData())
    assert sorted(selection.scores) == list(range(LAYERS))
    assert len(selection.selected) == 2
    assert model.prefix_layer_mask() == [i in selection.selected for i in range(LAYERS)]
    [pruned] = [i for i in range(LAYERS) if i not in selection.selected]
    end = trainable(model)
    for i in range(LAYERS):
        for name in (f"prefix.keys.{i}", f"prefix.values.{i}"):
            moved = not torch.equal(end[name], spy.at_selection[name])
            assert moved == (i != pruned), f"{name}: a pruned layer must stay put in epoch 1, a kept one must train"


# ---------------------------------------------------------------- teacher distillation
class TermSpy(Callback):
    """Placed after the teacher: each example's loss with and without the registered terms, at the first batch."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            with torch.no_grad():
                self.student = trainable(pl_module)
                self.with_terms = pl_module.example_losses(batch)
                terms, pl_module.loss_terms[:] = list(pl_module.loss_terms), []
                self.without = pl_module.example_losses(batch)
                pl_module.loss_terms[:] = terms


def test_teacher_distillation_adds_its_term_to_a_plain_modules_losses(tmp_path):
    torch.manual_seed(0)
    model, spy = PrefixMLP(), TermSpy()
    teacher = TeacherDistillation("public", weight=0.5, teacher_epochs=2, teacher_batch_size=8)
    quiet_trainer(tmp_path, max_epochs=1, callbacks=[teacher, spy]).fit(model, datamodule=TupleData())
    state = teacher.teacher_state
    assert set(state) == set(trainable(model)), "the teacher is the module's own clone, trained"
    assert not torch.equal(state["prefix.keys.0"], spy.student["prefix.keys.0"])
    # weight * ||P - P_teacher||, computed by hand from the teacher's weights and the student's
    distance = torch.sqrt(sum(((spy.student[f"prefix.{kind}.{i}"] - state[f"prefix.{kind}.{i}"]) ** 2).sum()
                              for i in range(LAYERS) for kind in ("keys", "values")))
    torch.testing.assert_close(spy.with_terms - spy.without, torch.full_like(spy.without, 0.5 * float(distance)))
    assert model.loss_terms == [], "the term is removed when training ends"


# ---------------------------------------------------------------- missing members
class Bare(pl.LightningModule):
    """A module that declares none of the contract."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(5, 2)
        self.trained = False

    def training_step(self, batch, batch_idx):
        self.trained = True
        return self.layer(batch[0].float()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("callback, missing", [
    (TeacherDistillation("public"), ["loss_terms", "before_optimizers", "prefix(batch_size", "clone_untrained("]),
    (SharpnessLayerSelection(keep_layers=1), ["prefix_layer_mask()", "set_prefix_layer_mask(keep", "example_losses(batch"]),
    (AdversarialWeightPerturbation(direction="raw"), ["example_losses(batch"]),
])
def test_a_module_missing_members_gets_one_error_listing_them_all_before_training(callback, missing, tmp_path):
    module = Bare()
    with pytest.raises(TypeError) as error:
        quiet_trainer(tmp_path, max_epochs=2, callbacks=[callback]).fit(module, datamodule=TupleData())
    message = str(error.value)
    listed = [line for line in message.splitlines() if line.startswith("  - ")]
    assert len(listed) == len(missing), message
    for name, line in zip(missing, listed):
        assert line.startswith(f"  - {name}"), message
        assert len(line.rsplit(": ", 1)[1].split()) >= 5, f"each entry says what the member must be: {line}"
    assert "Callbacks on your own LightningModule" in message
    assert not module.trained and not any(tmp_path.iterdir()), "refused before anything was trained or written"
