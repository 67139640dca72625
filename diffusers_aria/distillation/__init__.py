"""Knowledge distillation into compressed students (BK-SDM/KOALA UNets, block-subset DiTs): students, LoRA,
feature taps and losses."""

from .dit_students import (
    DIT_STUDENT_ARCHITECTURES,
    build_dit_student,
    dit_block_indices,
    dit_feature_mapping,
    dit_student_config,
    dit_student_key_map,
)
from .features import (
    FeatureProjections,
    FeatureTaps,
    default_feature_mapping,
    infer_feature_channels,
    self_attention_mapping,
)
from .lora import add_lora, base_state_dict, cast_trainable_to_fp32, save_lora_weights
from .losses import DistillationLoss, LossTerms, convert_prediction, prediction_target, snr_weights
from .reference_configs import count_parameters
from .students import (
    KOALA_ARCHITECTURES,
    STUDENT_ARCHITECTURES,
    UNET_STUDENT_ARCHITECTURES,
    StudentInitReport,
    build_student,
    kept_transformer_blocks,
    student_config,
    student_key_map,
)

__all__ = [
    "DIT_STUDENT_ARCHITECTURES",
    "KOALA_ARCHITECTURES",
    "STUDENT_ARCHITECTURES",
    "UNET_STUDENT_ARCHITECTURES",
    "DistillationLoss",
    "FeatureProjections",
    "FeatureTaps",
    "LossTerms",
    "StudentInitReport",
    "add_lora",
    "base_state_dict",
    "build_dit_student",
    "build_student",
    "cast_trainable_to_fp32",
    "convert_prediction",
    "count_parameters",
    "default_feature_mapping",
    "dit_block_indices",
    "dit_feature_mapping",
    "dit_student_config",
    "dit_student_key_map",
    "infer_feature_channels",
    "kept_transformer_blocks",
    "prediction_target",
    "save_lora_weights",
    "self_attention_mapping",
    "snr_weights",
    "student_config",
    "student_key_map",
]
