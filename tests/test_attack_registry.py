"""The audit runs the attacks of a registry: each declares what it needs and how it is summarised."""
import pytest
import torch
import torch.nn.functional as F

from pflat_lightning import PrefixConfig, PrefixTunedClassifier, PrivacyConfig
from pflat_lightning.attacks import ATTACK_REGISTRY, ATTACKS, register_attack, run_audit
from pflat_lightning.callbacks import MembershipInferenceAudit

from helpers import TokenDataset, collate


@pytest.fixture
def registry():
    """The registry as it was, restored after the test."""
    saved = dict(ATTACK_REGISTRY)
    yield ATTACK_REGISTRY
    ATTACK_REGISTRY.clear()
    ATTACK_REGISTRY.update(saved)


def test_an_unknown_attack_is_refused_with_the_registered_names(tiny_model_dir):
    assert ATTACKS == ("loss", "reference", "min_k", "zlib", "lira") == tuple(ATTACK_REGISTRY)
    module = PrefixTunedClassifier(tiny_model_dir("bert"), 2, prefix=PrefixConfig(num_virtual_tokens=2),
                                   privacy=PrivacyConfig(enabled=False))
    for call in (lambda: MembershipInferenceAudit(("loss", "entropy")),
                 lambda: run_audit(module, TokenDataset(4), TokenDataset(4, seed=1), attacks=("entropy",), collate_fn=collate)):
        with pytest.raises(ValueError, match="entropy") as error:
            call()
        assert all(repr(name) in str(error.value) for name in ATTACKS)


def test_a_registered_attack_is_validated_run_and_summarised(tiny_model_dir, registry):
    @register_attack("margin", needs=("reference",))
    def margin(inputs):
        # A hand-computed score from the inputs it is given: the negated loss of the audited module.
        return -inputs.stats.losses, {"margin_note": "by hand"}

    with pytest.raises(ValueError, match="must be new"):
        register_attack("loss")(margin)
    with pytest.raises(ValueError, match="each need one of"):
        register_attack("other", needs=("teacher",))
    assert "margin" not in ATTACKS and tuple(registry)[-1] == "margin"  # run and reported after the built-ins
    torch.manual_seed(0)
    module = PrefixTunedClassifier(tiny_model_dir("bert"), 2, prefix=PrefixConfig(num_virtual_tokens=2),
                                   privacy=PrivacyConfig(enabled=False))
    members, non_members = TokenDataset(6), TokenDataset(6, seed=1)
    with pytest.raises(ValueError, match="'margin' attack needs reference="):
        run_audit(module, members, non_members, attacks=("margin",), collate_fn=collate)
    result = run_audit(module, members, non_members, attacks=("margin", "loss"), reference=module, collate_fn=collate,
                       num_examples=None)
    assert list(result.summary["attacks"]) == ["loss", "margin"] and result.summary["margin_note"] == "by hand"
    module.eval()
    for half, data in zip(result.scores["margin"].split(6), (members, non_members)):
        batch = collate([data[i] for i in range(len(data))])
        with torch.no_grad():
            losses = F.cross_entropy(module.model(batch["input_ids"], batch["attention_mask"]), batch["labels"],
                                     reduction="none")
        # The audit draws the examples in a seeded order: compare as sets of values.
        assert torch.allclose(half.sort().values, (-losses).sort().values.to(half.dtype), atol=1e-5)
