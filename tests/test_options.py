"""The CLI is generated from the config dataclasses: one option per field, no default typed twice, config
files layered under the flags, and clear one-line errors for bad values."""
from __future__ import annotations

import dataclasses
import json

import click
import pytest
from click.testing import CliRunner

from pipeline.core.errors import ConfigError
from trainer.cli import main
from trainer.config import (CacheTeacherConfig, DemoCommandConfig, EvalConfig, ExportConfig, ReportConfig, ShardConfig,
                            SynthConfig, TrainConfig, VerifyConfig, command_config, from_dict, make_config,
                            resolve_train, to_dict)
from trainer.options import fields_of, given, read_config_file

COMMANDS = {"train": TrainConfig, "cache-teacher": CacheTeacherConfig, "shard": ShardConfig, "eval": EvalConfig,
            "export": ExportConfig, "synth": SynthConfig, "verify": VerifyConfig, "report": ReportConfig,
            "demo": DemoCommandConfig}
HAND_WRITTEN = {"config_file", "resume", "stop_after_steps", "help"}


@pytest.mark.parametrize("command,cls", COMMANDS.items())
def test_every_config_field_is_one_generated_option_with_no_default_of_its_own(command, cls):
    cmd = main.commands[command]
    params = {p.name: p for p in cmd.params if isinstance(p, click.Option)}
    opts = fields_of(cls)
    assert {o.param for o in opts} == set(params) - HAND_WRITTEN  # nothing missing, nothing extra
    for o in opts:
        assert params[o.param].default is None, o.flag  # "not given": the dataclass holds the default
    if cls is TrainConfig:  # nested fields are flattened and keep their own names
        assert {"alpha", "lr", "weight_fn", "kl_direction", "decay_norm_and_bias"} <= set(params)


def test_help_shows_the_dataclass_defaults_and_choices():
    text = CliRunner().invoke(main, ["train", "--help"], terminal_width=200).output
    assert "[default: 50]" in text and "[default: the --mode preset's]" in text
    assert "[confidence|none|entropy]" in text and "[shorter|square]" in text
    assert "--reuse-views / --no-reuse-views" in text
    ct = CliRunner().invoke(main, ["cache-teacher", "--help"], terminal_width=200).output
    assert "[default: 50]" in ct and "--chunk" in ct  # the paper's 50 augmentation epochs


def test_layers_defaults_preset_file_flags():
    file = to_dict(make_config("dual", epochs=7, shards="s"))
    cfg = resolve_train({"mode": "kd", "optim": {"lr": 0.5}}, file)
    # --mode changed: the kd preset's loss and students, the file's other fields, then the flags
    assert cfg.mode == "kd" and cfg.students == ("resnet18",) and cfg.loss.alpha == 0.3 and cfg.loss.weight_fn == "none"
    assert cfg.epochs == 7 and cfg.shards == "s" and cfg.optim.lr == 0.5
    same = resolve_train({"epochs": 9}, file)  # the file's mode: its own loss weights stay
    assert same.mode == "dual" and same.loss == make_config("dual").loss and same.epochs == 9


def test_toml_and_json_config_files(tmp_path):
    (tmp_path / "run.toml").write_text('mode = "uw-kd"\nepochs = 3\nstudents = ["tiny_cnn"]\n[loss]\ntau = 2.0\n'
                                       '[optim]\nlr = 0.05\n')
    cfg = resolve_train({"shards": "x"}, read_config_file(tmp_path / "run.toml"))
    assert (cfg.mode, cfg.epochs, cfg.students, cfg.loss.tau, cfg.loss.alpha, cfg.optim.lr) == \
        ("uw-kd", 3, ("tiny_cnn",), 2.0, 0.3, 0.05)
    # a run's config.json (with its runtime section) round-trips
    (tmp_path / "config.json").write_text(json.dumps({**to_dict(cfg), "runtime": {"world_size": 1}}))
    assert resolve_train({}, read_config_file(tmp_path / "config.json")) == cfg
    ct = command_config(CacheTeacherConfig, {"teacher_weights": "t.pt", "seed": 3},
                        {"shards": "s", "out": "c.zarr", "seed": 1, "epochs": 2})
    assert (ct.seed, ct.epochs, ct.out) == (3, 2, "c.zarr")  # the flag wins over the file


@pytest.mark.parametrize("text,match", [
    ('epochs = "5"', r"config key epochs \(--epochs\): expected int"),
    ("epochs = 0", r"config key epochs \(--epochs\): 0 must be at least 1"),
    ("loss = 3", r"config section loss must be a table/object, got int"),
    ('amp = "fp8"', r"config key amp \(--amp\): 'fp8' is not one of"),
    ("[optim]\nlr = inf", r"config key optim.lr \(--lr\): expected a finite number, got inf"),
    ("nope = 1", "unknown config key"),
    ("[loss]\nzeta = 1", r"unknown config key\(s\) loss.zeta"),
    ("zeta = 1\n[loss]\nzeta = 1\n[optim]\nfoo = 2", r"unknown config key\(s\) loss.zeta, optim.foo, zeta;"),
    ("epochs = ", "not valid TOML"),
])
def test_bad_config_files_are_one_clear_line(tmp_path, text, match):
    f = tmp_path / "bad.toml"
    f.write_text(text + "\n")
    with pytest.raises(ConfigError, match=match):
        resolve_train({}, read_config_file(f))
    res = CliRunner().invoke(main, ["train", "--config", str(f), "--shards", str(tmp_path)])
    assert res.exit_code == 2 and "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1


def test_missing_required_and_resume_without_a_run(tmp_path):
    res = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "missing required option(s): --shards" in res.output
    res = CliRunner().invoke(main, ["cache-teacher", "--shards", str(tmp_path)])
    assert res.exit_code == 2 and "--out, --teacher-weights" in res.output
    res = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "r"), "--resume"])
    assert res.exit_code == 1 and "config.json not found" in res.output


def test_given_only_returns_what_was_typed():
    params = {o.param: None for o in fields_of(TrainConfig)} | {"students": "a, b", "alpha": 0.5, "shards": "x"}
    assert given(TrainConfig, params) == {"students": ("a", "b"), "loss": {"alpha": 0.5}, "shards": "x"}


def test_legacy_uncertainty_flag_maps_to_the_weight_function():
    old = {**to_dict(make_config("kd")), "loss": {**dataclasses.asdict(make_config("kd").loss), "uncertainty": True}}
    del old["loss"]["weight_fn"]
    assert from_dict(old).loss.weight_fn == "confidence"


def test_compile_takes_a_mode_and_old_runs_bool_still_loads():
    for old, mode in ((True, "default"), (False, "off")):  # config.json of runs from before the modes
        assert from_dict({**to_dict(make_config("kd")), "compile": old}).compile == mode
        assert resolve_train({}, saved={**to_dict(make_config("kd")), "compile": old}).compile == mode
    cfg = resolve_train({"compile": "max-autotune-no-cudagraphs"}, saved={**to_dict(make_config("kd")),
                                                                            "compile": True})
    assert cfg.compile == "max-autotune-no-cudagraphs"  # a resumed run may change it: numbers stay the model's
    with pytest.raises(ConfigError, match="compile"):
        from_dict({**to_dict(make_config("kd")), "compile": "fast"})
    res = CliRunner().invoke(main, ["train", "--shards", ".", "--out", "x", "--compile", "fast"])
    assert res.exit_code == 2 and "'fast' is not one of 'off', 'default', 'max-autotune-no-cudagraphs'" in res.output


def test_the_cli_builds_its_options_without_importing_torch():
    """`kdpipe --help` stays fast: the config dataclasses (and so every option) load without torch."""
    import subprocess
    import sys

    code = "import sys, trainer.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# Every flag the hand-written options of synth, verify, report and demo had, before they were generated from
# their dataclasses (trainer/config_commands.py): the generated ones may add --no-x, never drop a flag.
HAND_FLAGS = {
    "synth": ["--out", "--classes", "--num-classes", "--train-per-class", "--val-per-class", "--val-layout", "--size",
              "--oddities", "--no-oddities", "--broken", "--no-broken", "--seed", "--learnable", "--ambiguous-share"],
    "verify": ["--shards", "--cache", "--workers"],
    "report": ["--out", "--teacher", "--low-w", "--learnable"],
    "demo": ["--out", "--preset", "--tiny", "--backend", "--device", "--seeds"],
}


@pytest.mark.parametrize("command", sorted(HAND_FLAGS))
def test_generated_commands_keep_every_flag_and_default(command):
    import re

    from click.testing import CliRunner

    from trainer.cli import main

    out = CliRunner().invoke(main, [command, "--help"], terminal_width=200).output
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", out))
    assert set(HAND_FLAGS[command]) <= flags, sorted(set(HAND_FLAGS[command]) - flags)
    defaults = {"synth": ["[default: 4]", "[default: 375 500]", "[default: folders]", "[default: 0.15]"],
                "report": ["[default: 0.5]"], "demo": ["[default: demo]", "[default: the preset's: auto]"],
                "verify": []}[command]
    text = " ".join(out.split())
    assert all(d in text for d in defaults), out


def test_a_resume_clash_shows_values_as_flags_take_them():
    from pipeline.core.errors import ConfigError
    from trainer.config import make_config, resolve_train, to_dict

    saved = to_dict(make_config("dual", ("tiny_cnn", "tiny_mobilenet"), teacher="tiny_resnet"))
    with pytest.raises(ConfigError) as e:
        resolve_train({"students": ("tiny_cnn",), "mode": "kd"}, saved=saved)
    assert "--students tiny_cnn (the run has tiny_cnn,tiny_mobilenet)" in str(e.value)
    assert "--mode kd (the run has dual)" in str(e.value)
