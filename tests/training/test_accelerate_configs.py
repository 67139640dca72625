"""The shipped accelerate configs load with accelerate's own parser and say what their names promise."""

from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[2] / "train_scripts" / "accelerate_configs"


@pytest.mark.parametrize("name,kind,procs,machines", [
    ("ddp_4gpu.yaml", "MULTI_GPU", 4, 1),
    ("multinode_2x8.yaml", "MULTI_GPU", 16, 2),
    ("deepspeed_zero2.yaml", "DEEPSPEED", 8, 1),
])
def test_config_loads(name, kind, procs, machines):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(CONFIGS / name))
    assert str(cfg.distributed_type).endswith(kind)
    assert cfg.num_processes == procs and cfg.num_machines == machines
    assert cfg.mixed_precision == "bf16" and not cfg.use_cpu
    if kind == "DEEPSPEED":
        assert cfg.deepspeed_config["zero_stage"] == 2
