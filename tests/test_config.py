"""Each config key is declared once: its owner (ATObjective, Budget, NoiseSchedule) checks it, the config
says the owner's message with the key and flag, and the API and the CLI accept the same spellings."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from train_helpers import POINTS, assert_one_line_error, run_cli

import fastat.at.objective as objective_module
from fastat import ATObjective
from fastat.app.cli import build_parser
from fastat.at.attack import TARGETS
from fastat.at.budget import Budget
from fastat.at.schedule import NoiseSchedule
from fastat.train.config import ConfigError, TrainConfig, label, plain
from fastat.train.config_keys import FLAGS
from fastat.utils.checks import SettingError, must

SPELLINGS = [("eps", "eps"), ("epsilon", "eps"), ("v", "v"), ("v_prediction", "v"), ("x0", "x0"),
             ("sample", "x0"), ("V_Prediction", "v")]  # fmt: skip


@pytest.mark.parametrize(("name", "canonical"), SPELLINGS)
def test_prediction_spellings_are_the_same_in_the_api_and_the_config(name, canonical):
    assert ATObjective(prediction=name).prediction == canonical
    cfg = TrainConfig().with_overrides({"objective.prediction": name}).validate()
    assert cfg.objective.prediction == canonical  # the config holds (and saves) the canonical name
    assert cfg.build_objective().prediction == canonical


def test_set_v_prediction_trains_and_the_run_folder_keeps_v(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", *POINTS, "--steps", "2", "--out", out]
    code, _, err = run_cli(capsys, *args, "--set", "objective.prediction=v_prediction")
    assert code == 0, err
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["objective"]["prediction"] == "v" == ATObjective(prediction="v_prediction").prediction
    # resuming with the other spelling is the same config (no "changed setting" refusal)
    code, _, err = run_cli(capsys, *args[:-2], "--steps", "3", "--resume", out,
                           "--set", "objective.prediction=v")  # fmt: skip
    assert code == 0, err


def test_an_unknown_prediction_is_refused_with_the_key_and_every_spelling(capsys):
    code, _, err = run_cli(capsys, "train", "--dry-run", "--set", "objective.prediction=score")
    assert_one_line_error(code, err, "unknown objective.prediction 'score'", "v_prediction", "sample")


# (config key, a bad value as the config holds it, the owner built with that value)
OWNED = {
    "objective.mode": ("fgsm", lambda v: ATObjective(mode=v)),
    "objective.lam": (-0.5, lambda v: ATObjective(lam=v)),
    "objective.lam_scale": ("square", lambda v: ATObjective(lam_scale=v)),
    "objective.lam_s_min": (1.0, lambda v: ATObjective(lam_s_min=v)),
    "objective.reg_frac": (0.0, lambda v: ATObjective(reg_frac=v)),
    "objective.replays": (0, lambda v: ATObjective(replays=v)),
    "objective.pgd_steps": (0, lambda v: ATObjective(pgd_steps=v)),
    "objective.step_size": (-1.0, lambda v: ATObjective(step_size=v)),
    "objective.attack_target": ("loss", lambda v: ATObjective(attack_target=v)),
    "objective.prediction": ("score", lambda v: ATObjective(prediction=v)),
    "objective.dm_weight": ("snr", lambda v: ATObjective(dm_weight=v)),
    "objective.r_min": (-0.1, lambda v: Budget(r_min=v)),
    "objective.r_scale": (-1.0, lambda v: Budget(r_scale=v)),
    "objective.rho": (0.0, lambda v: Budget(rho=v)),
    "objective.space": ("z", lambda v: Budget(space=v)),
    "objective.norm": ("l1", lambda v: Budget(norm=v)),
    "objective.schedule": ("sqrt", lambda v: NoiseSchedule(kind=v)),
    "objective.T": (0, lambda v: NoiseSchedule(T=v)),
    "objective.beta_start": (0.5, lambda v: NoiseSchedule(beta_start=v)),
}


@pytest.mark.parametrize("key", list(OWNED))
def test_each_objective_rule_is_the_owners_said_with_key_and_flag(key):
    value, build = OWNED[key]
    with pytest.raises(SettingError) as owner:
        build(value)
    with pytest.raises(ConfigError) as config:
        TrainConfig().with_overrides({key: value}).validate()
    assert str(config.value) == owner.value.message(label(key))
    assert label(key) in str(config.value)


def test_the_empty_budget_is_the_budgets_rule_and_ddpm_still_checks_the_radii():
    with pytest.raises(ConfigError, match=r"the budget is empty: objective.r_min = r_scale = 0"):
        TrainConfig().with_overrides({"objective.r_min": 0, "objective.r_scale": 0}).validate()
    ddpm = {"objective.mode": "ddpm", "objective.r_min": 0, "objective.r_scale": 0}
    TrainConfig().with_overrides(ddpm).validate()  # no attack: no budget needed
    with pytest.raises(ConfigError, match=r"objective.r_min must be a finite number >= 0, got -1.0"):
        TrainConfig().with_overrides({**ddpm, "objective.r_min": -1}).validate()


def test_the_config_keeps_no_copy_of_the_attack_targets(monkeypatch):
    over = {"objective.attack_target": "sideways"}
    with pytest.raises(ConfigError, match="choose one of " + ", ".join(TARGETS)):
        TrainConfig().with_overrides(over).validate()
    monkeypatch.setattr(objective_module, "TARGETS", (*TARGETS, "sideways"))
    TrainConfig().with_overrides(over).validate()  # the owner's list is the only one


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--set", "objective.attack_target=loss"],
         ["unknown objective.attack_target 'loss'", "choose one of " + ", ".join(TARGETS)]),
        (["--lam", "-1"], ["objective.lam (--lam) must be a finite number in [0, 1e4], got -1.0"]),
        (["--mode", "fgsm"], ["unknown objective.mode (--mode) 'fgsm'"]),
        (["--set", "objective.schedule=sqrt"], ["unknown objective.schedule 'sqrt'"]),
        (["--set", "objective.T=0"], ["objective.T must be a positive integer, got 0"]),
    ],
)  # fmt: skip
def test_the_cli_says_the_owners_rule_with_key_and_flag(args, needles, capsys):
    code, _, err = run_cli(capsys, "train", "--dry-run", *args)
    assert_one_line_error(code, err, *needles)


def test_every_flag_sets_a_config_key_and_labels_name_it():
    cfg = TrainConfig()
    for dest, (key, typ, _) in FLAGS.items():
        section, name = key.split(".")
        field = {f.name: f for f in dataclasses.fields(getattr(cfg, section))}[name]
        assert field.type.split(" |")[0] == typ.__name__, key  # the flag parses what the key holds
        assert label(key) == f"{key} (--{dest.replace('_', '-')})"
    assert label("objective.rho") == "objective.rho"  # no flag
    args = build_parser().parse_args(["train", "--reg-frac", "0.5", "--batch-size", "8"])
    assert (args.reg_frac, args.batch_size) == (0.5, 8)


def test_setting_error_names_the_setting_as_the_caller_says_it():
    e = must("lam", "a finite number >= 0", "{name}")  # a value that looks like the placeholder stays
    assert str(e) == "lam must be a finite number >= 0, got '{name}'"
    said = e.message("objective.lam (--lam)")
    assert said == "objective.lam (--lam) must be a finite number >= 0, got '{name}'"
    assert isinstance(e, ValueError) and e.setting == "lam"
    bare = SettingError("beta_start", "both betas are off")
    assert (str(bare), bare.message("objective.beta_start")) == (
        "both betas are off", "objective.beta_start: both betas are off")  # fmt: skip


def test_plain_turns_tuples_into_lists_as_yaml_gives_them_back():
    d = TrainConfig().to_dict()
    assert d["optim"]["betas"] == [0.9, 0.999]
    assert plain({"a": (1, {"b": (2,)})}) == {"a": [1, {"b": [2]}]}
    assert TrainConfig.from_dict(yaml.safe_load(TrainConfig().to_yaml())) == TrainConfig()
