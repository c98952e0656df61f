"""Training flags: the original's names and defaults, its train_lora.sh, its DeepSpeed configs, the CLI path, and the
rejected combinations."""

import json
import os
import subprocess
import sys
from unittest import mock

import pytest
from test_train_support import SCRIPTS, demo_base_model, script_flags, synthetic_data, training_argv

from qscorer.cli import build_parser
from qscorer.errors import QScorerError
from qscorer.train.arguments import argument_parser, arguments_from_namespace, parse_arguments

ORIGINAL_DEFAULTS = {
    "model": {"model_name_or_path": "facebook/opt-125m", "version": "v0", "freeze_backbone": False},
    "data": {
        "dataset_type": "single",
        "data_paths": [],
        "data_weights": [],
        "lazy_preprocess": False,
        "is_multimodal": False,
        "image_folder": None,
        "image_aspect_ratio": "square",
        "image_grid_pinpoints": None,
    },
    "training": {
        "cache_dir": None,
        "optim": "adamw_torch",
        "remove_unused_columns": False,
        "weight_desp": 1.0,
        "weight_next_token": 1.0,
        "weight_in_level": None,
        "continuous_rating_loss": True,
        "binary_rating_loss": "fidelity",
        "closeset_rating_loss": False,
        "use_fix_std": True,
        "detach_pred_std": False,
        "tune_visual_abstractor": False,
        "freeze_vision_model": True,
        "model_max_length": 512,
        "double_quant": True,
        "quant_type": "nf4",
        "bits": 16,
        "lora_enable": False,
        "lora_r": 128,
        "lora_alpha": 256,
        "lora_dropout": 0.05,
        "lora_weight_path": "",
        "lora_bias": "none",
        "visual_abstractor_lr": None,
        "group_by_modality_length": False,
        "save_safetensors": False,
        "seed": 42,
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "adam_epsilon": 1e-8,
        "max_grad_norm": 1.0,
    },
}


def test_every_original_flag_has_its_name_and_default(tmp_path):
    model_args, data_args, training_args = argument_parser().parse_args_into_dataclasses(
        args=["--output_dir", str(tmp_path)], look_for_args_file=False
    )
    for arguments, expected in zip((model_args, data_args, training_args), ORIGINAL_DEFAULTS.values()):
        assert {name: getattr(arguments, name) for name in expected} == expected


def test_train_lora_sh_carries_the_original_values():
    flags = script_flags()
    values = dict(zip(flags[::2], flags[1::2]))
    assert len(values) * 2 == len(flags)
    assert values == {
        "--deepspeed": "$SCRIPTS_DIR/zero2.json",
        "--lora_enable": "True",
        "--model_name_or_path": "$BASE_MODEL",
        "--version": "v1",
        "--dataset_type": "single",
        "--weight_next_token": "0.05",
        "--continuous_rating_loss": "True",
        "--closeset_rating_loss": "True",
        "--use_fix_std": "True",
        "--detach_pred_std": "True",
        "--data_paths": "$META",
        "--data_weights": "1",
        "--image_folder": "$DATA_ROOT/",
        "--output_dir": "$OUTPUT_DIR",
        "--image_aspect_ratio": "pad",
        "--group_by_modality_length": "True",
        "--bf16": "True",
        "--num_train_epochs": "3",
        "--per_device_train_batch_size": "16",
        "--per_device_eval_batch_size": "4",
        "--gradient_accumulation_steps": "1",
        "--evaluation_strategy": "no",
        "--save_strategy": "no",
        "--learning_rate": "2e-5",
        "--weight_decay": "0.",
        "--warmup_ratio": "0.03",
        "--lr_scheduler_type": "cosine",
        "--logging_steps": "1",
        "--tf32": "True",
        "--model_max_length": "2048",
        "--gradient_checkpointing": "True",
        "--tune_visual_abstractor": "True",
        "--freeze_vision_model": "False",
        "--dataloader_num_workers": "4",
        "--lazy_preprocess": "True",
        "--report_to": "tensorboard",
    }
    assert "localhost:$GPU_IDS" in (SCRIPTS / "train_lora.sh").read_text()


def test_train_lora_sh_flags_parse_on_this_transformers(tmp_path):
    data = synthetic_data()
    places = {
        "$SCRIPTS_DIR/zero2.json": str(SCRIPTS / "zero2.json"),
        "$BASE_MODEL": str(demo_base_model()),
        "$META": str(data / "metas" / "train.json"),
        "$DATA_ROOT/": f"{data}/",
        "$OUTPUT_DIR": str(tmp_path),
    }
    flags = [places.get(flag, flag) for flag in script_flags()]
    # This machine has no GPU: bf16 / tf32 / tensorboard are the script's GPU choices. transformers 4.57 records
    # DeepSpeed use in the environment, which must not leak into the other tests.
    with mock.patch.dict(os.environ):
        model_args, data_args, args = parse_arguments(flags + ["--bf16", "False", "--tf32", "False", "--report_to",
                                                               "none"])
    assert model_args.version == "v1" and data_args.image_aspect_ratio == "pad" and data_args.data_weights == [1]
    assert args.lora_enable and args.weight_next_token == 0.05 and args.gradient_checkpointing
    assert str(args.eval_strategy).lower().endswith("no") and str(args.lr_scheduler_type).lower().endswith("cosine")
    assert getattr(args, "warmup_ratio", None) == 0.03
    assert args.learning_rate == 2e-5 and args.weight_decay == 0.0 and args.model_max_length == 2048
    assert args.deepspeed == str(SCRIPTS / "zero2.json")


def test_train_lora_sh_explains_missing_environment():
    result = subprocess.run(["bash", str(SCRIPTS / "train_lora.sh"), "0"], capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert "usage: BASE_MODEL=" in result.stderr and "DATA_ROOT=" in result.stderr


def test_deepspeed_configs_have_the_original_contents():
    precision = {
        "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
                 "hysteresis": 2, "min_loss_scale": 1},
        "bf16": {"enabled": "auto"},
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
    }
    common = {"overlap_comm": True, "contiguous_gradients": True, "sub_group_size": 1e9, "reduce_bucket_size": "auto"}
    assert json.loads((SCRIPTS / "zero2.json").read_text()) == {
        **precision, "zero_optimization": {"stage": 2, **common}
    }
    assert json.loads((SCRIPTS / "zero3.json").read_text()) == {
        **precision,
        "zero_optimization": {
            "stage": 3,
            **common,
            "stage3_param_persistence_threshold": "auto",
            "stage3_max_live_parameters": 0,
            "stage3_max_reuse_distance": 0,
            "stage3_prefetch_bucket_size": 0,
            "stage3_gather_16bit_weights_on_model_save": True,
        },
    }


def test_cli_sub_parser_takes_the_same_flags(tmp_path):
    argv = training_argv(tmp_path, "--weight_soft_kl", "0.5", "--no_use_fix_std")
    namespace = build_parser("train").parse_args(["train", *argv])
    from_cli = arguments_from_namespace(namespace)
    direct = parse_arguments(argv)
    assert from_cli[:2] == direct[:2]
    assert from_cli[2].to_dict() == direct[2].to_dict()
    assert from_cli[2].weight_soft_kl == 0.5 and from_cli[2].use_fix_std is False


def test_cli_help_lists_the_training_flags():
    result = subprocess.run([sys.executable, "-m", "qscorer", "train", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for flag in ("--lora_enable", "--tune_visual_abstractor", "--visual_abstractor_lr", "--weight_soft_kl",
                 "--evaluation_strategy", "--per_device_train_batch_size"):
        assert flag in result.stdout


def test_evaluation_strategy_is_an_alias(tmp_path):
    args = parse_arguments(training_argv(tmp_path, "--evaluation_strategy", "no"))[2]
    assert str(args.eval_strategy).lower().endswith("no")
    with pytest.raises(QScorerError, match="disagree"):
        parse_arguments(training_argv(tmp_path, "--evaluation_strategy", "no", "--eval_strategy", "epoch"))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data_weights", "1", "2"], "has 1 files but --data_weights has 2 values"),
        (["--data_weights", "0"], "not all 0"),
        (["--bits", "4"], "QLoRA"),
        (["--bits", "8"], "QLoRA"),
        (["--fp16", "True"], "needs a CUDA GPU"),
        (["--visual_abstractor_lr", "1e-4", "--tune_visual_abstractor", "False"], "abstractor is frozen"),
        (["--version", "v0"], "no training template"),
        (["--lora_enable", "False", "--lora_weight_path", "x"], "needs --lora_enable True"),
        (["--weight_rank", "-1"], "--weight_rank -1.0 must be >= 0"),
        (["--remove_unused_columns", "True"], "leave it False"),
        (["--model_name_or_path", "/nonexistent/base"], "is not a folder"),
        (["--data_paths", "/nonexistent/meta.json"], "is not a file"),
    ],
)
def test_invalid_combinations_are_refused(tmp_path, extra, message):
    with pytest.raises(QScorerError, match=message):
        parse_arguments(training_argv(tmp_path, *extra))


def test_empty_data_paths_are_refused(tmp_path):
    argv = training_argv(tmp_path)
    position = argv.index("--data_paths")
    with pytest.raises(QScorerError, match="--data_paths is empty"):
        parse_arguments(argv[:position] + argv[position + 2 :])


def test_unknown_flags_and_bad_choices_are_named(tmp_path, capsys):
    with pytest.raises(QScorerError, match="--no_such_flag"):
        parse_arguments(training_argv(tmp_path, "--no_such_flag", "1"))
    with pytest.raises(SystemExit) as raised:
        parse_arguments(training_argv(tmp_path, "--binary_rating_loss", "hinge"))
    assert raised.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
