"""The Privacy-Flat flattening techniques, one Lightning callback each."""
from pflat_lightning.callbacks.adversarial_weight_perturbation import AdversarialWeightPerturbation
from pflat_lightning.callbacks.loss_landscape import LossLandscape
from pflat_lightning.callbacks.membership_inference_audit import MembershipInferenceAudit
from pflat_lightning.callbacks.sharpness_layer_selection import SharpnessLayerSelection
from pflat_lightning.callbacks.teacher_distillation import TeacherDistillation

__all__ = ["AdversarialWeightPerturbation", "LossLandscape", "MembershipInferenceAudit", "SharpnessLayerSelection", "TeacherDistillation"]
