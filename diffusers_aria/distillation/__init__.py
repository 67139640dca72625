"""Knowledge distillation into BK-SDM-style student UNets: students, LoRA, feature taps and losses."""

from .features import FeatureProjections, FeatureTaps, default_feature_mapping, infer_feature_channels
from .lora import add_lora, base_state_dict, cast_trainable_to_fp32, save_lora_weights
from .losses import DistillationLoss, LossTerms, convert_prediction, prediction_target, snr_weights
from .students import STUDENT_ARCHITECTURES, StudentInitReport, build_student, student_config, student_key_map

__all__ = [
    "STUDENT_ARCHITECTURES",
    "DistillationLoss",
    "FeatureProjections",
    "FeatureTaps",
    "LossTerms",
    "StudentInitReport",
    "add_lora",
    "base_state_dict",
    "build_student",
    "cast_trainable_to_fp32",
    "convert_prediction",
    "default_feature_mapping",
    "infer_feature_channels",
    "prediction_target",
    "save_lora_weights",
    "snr_weights",
    "student_config",
    "student_key_map",
]
