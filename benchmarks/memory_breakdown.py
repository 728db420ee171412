"""Where ours and the PEFT + Opacus peer differ in memory (bundled MiniLM, batch 32, length 64).

    python benchmarks/memory_breakdown.py

Prints (1) the bytes autograd saves for backward in one training forward of each (the activation
memory of a step) and (2) the resident size of each stack's imports in a fresh interpreter.
"""
from __future__ import annotations

import subprocess
import sys

import torch
import torch.nn.functional as F
from torch.autograd.graph import saved_tensors_hooks

IMPORTS = {
    "peer (torch, transformers, opacus, peft)": "import torch, transformers, opacus, peft",
    "ours (torch, transformers, opacus, lightning, torchmetrics, pflat_lightning)":
        "import torch, transformers, opacus, lightning.pytorch, torchmetrics, pflat_lightning",
}


def saved_mib(forward) -> float:
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return sum(storages.values()) / 2**20


def import_mib(statement: str) -> float:
    code = (f"{statement}\nimport os\n"
            "print(int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20)")
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split()[-1])


def main() -> None:
    from peft import PrefixTuningConfig, TaskType, get_peft_model
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from pflat_lightning import PrefixConfig, PrefixTunedClassifier, PrivacyConfig
    from pflat_lightning.bundled import resolve_model

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2000, 5000, (32, 64), generator=g)
    mask, labels = torch.ones_like(ids), torch.randint(0, 2, (32,), generator=g)
    ours = PrefixTunedClassifier("bundled-minilm", 2, prefix=PrefixConfig(num_virtual_tokens=10),
                                 privacy=PrivacyConfig(enabled=False))
    path = resolve_model("bundled-minilm")
    config = AutoConfig.from_pretrained(path, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    peer = get_peft_model(AutoModelForSequenceClassification.from_pretrained(path, config=config),
                          PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=10)).train()
    print(f"saved for backward, ours: {saved_mib(lambda: F.cross_entropy(ours(ids, mask), labels)):.1f} MiB")
    print(f"saved for backward, peer: {saved_mib(lambda: peer(input_ids=ids, attention_mask=mask, labels=labels).loss):.1f} MiB")
    for name, statement in IMPORTS.items():
        print(f"resident after imports, {name}: {import_mib(statement):.0f} MiB")


if __name__ == "__main__":
    main()
