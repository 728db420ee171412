"""The Privacy-Flat flattening techniques, one Lightning callback each."""
from typing import TYPE_CHECKING

from pflat_lightning.lazy import lazy_exports

if TYPE_CHECKING:
    from pflat_lightning.callbacks.adversarial_weight_perturbation import AdversarialWeightPerturbation
    from pflat_lightning.callbacks.loss_landscape import LossLandscape
    from pflat_lightning.callbacks.membership_inference_audit import MembershipInferenceAudit
    from pflat_lightning.callbacks.sharpness_layer_selection import SharpnessLayerSelection
    from pflat_lightning.callbacks.teacher_distillation import TeacherDistillation

# Imported on first use: the audit and the landscape callbacks pull in the attacks and the landscape,
# which `import pflat_lightning` (whose causal LM imports TeacherDistillation) must not.
__getattr__, __dir__ = lazy_exports(__name__, {
    "AdversarialWeightPerturbation": "pflat_lightning.callbacks.adversarial_weight_perturbation",
    "LossLandscape": "pflat_lightning.callbacks.loss_landscape",
    "MembershipInferenceAudit": "pflat_lightning.callbacks.membership_inference_audit",
    "SharpnessLayerSelection": "pflat_lightning.callbacks.sharpness_layer_selection",
    "TeacherDistillation": "pflat_lightning.callbacks.teacher_distillation",
})

__all__ = ["AdversarialWeightPerturbation", "LossLandscape", "MembershipInferenceAudit", "SharpnessLayerSelection", "TeacherDistillation"]
