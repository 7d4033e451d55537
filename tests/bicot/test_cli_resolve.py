"""``--ckpt_path=last`` resolves to the newest last checkpoint of the configured ModelCheckpoint folder; runs
without a name get a fresh one; jsonargparse's reports are cut to their reason."""

from __future__ import annotations

import os
import random

import pytest
from jsonargparse import Namespace

from bicot.cli import check_config_shares, fresh_run_name, names_class, resolve_checkpoint, user_message


def trainer_config(dirpath) -> Namespace:
    checkpoint = Namespace(
        class_path="lightning.pytorch.callbacks.ModelCheckpoint", init_args=Namespace(dirpath=str(dirpath))
    )
    return Namespace(
        callbacks=[Namespace(class_path="callbacks.RunMetadata", init_args=Namespace()), checkpoint]
    )


def test_last_is_the_newest_of_last_and_its_versions(tmp_path):
    # A second fresh run into the same folder makes Lightning write last-v1.ckpt beside the first run's last.ckpt.
    for age, name in enumerate(["last-v1.ckpt", "last.ckpt", "last-v2.ckpt"]):
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (1000 + age, 1000 + age))
    assert resolve_checkpoint("last", trainer_config(tmp_path)) == tmp_path / "last-v2.ckpt"
    os.utime(tmp_path / "last.ckpt", (5000, 5000))
    assert resolve_checkpoint("last", trainer_config(tmp_path)) == tmp_path / "last.ckpt"


def test_last_without_a_checkpoint_says_how_to_get_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_last"):
        resolve_checkpoint("last", trainer_config(tmp_path))


@pytest.mark.parametrize("package", ["lightning.pytorch", "lightning.fabric", "pytorch_lightning"])
def test_lightnings_advertising_tips_are_dropped_and_other_info_is_kept(package):
    """Whichever Lightning package was imported last owns the rank-zero logger: the filter covers each."""
    import importlib
    import logging

    import lightning_utilities.core.rank_zero as rank_zero_module

    import bicot.cli  # noqa: F401  (installs the filter)

    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed")
    original = rank_zero_module.log
    importlib.reload(importlib.import_module(f"{package}.utilities.rank_zero"))  # it takes the logger, as on import
    logger = rank_zero_module.log
    assert logger.name == f"{package}.utilities.rank_zero"
    seen: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        rank_zero_module.rank_zero_info("💡 Tip: For seamless cloud logging, try installing [litlogger]")
        rank_zero_module.rank_zero_info("GPU available: False, used: False")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        rank_zero_module.log = original
    assert seen == ["GPU available: False, used: False"]


def test_fresh_run_names_differ_under_a_fixed_seed_and_leave_the_seeded_stream_alone():
    names = set()
    for _ in range(5):
        random.seed(0)  # what seed_everything(0) does before MLflow would draw a name
        names.add(fresh_run_name())
        assert random.random() == random.Random(0).random()  # the seeded stream goes on untouched
    assert len(names) > 1 and all(name and " " not in name for name in names)


def test_a_union_report_is_cut_to_its_reason_on_one_line():
    report = (
        "Does not validate against any of the Union subtypes\nSubtypes: [<class 'bicot.loss.GRPOConfig'>, "
        "<class 'NoneType'>]\nErrors:\n  - GRPOConfig.num_generations must be >= 2, got 1\n  - Expected a "
        "<class 'NoneType'>\nGiven value type: <class 'jsonargparse._namespace.Namespace'>\nGiven value: "
        "Namespace(beta=0.01, num_generations=1)"
    )
    assert user_message(ValueError(report)) == "GRPOConfig.num_generations must be >= 2, got 1"
    assert user_message(ValueError("Problem with given class_path 'x':\n  bad")) == (
        "Problem with given class_path 'x': bad"
    )


def test_a_config_file_that_is_not_yaml_is_named_with_its_line(tmp_path):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("model:\n  class_path: bicot.scoring.FolderScorer\n")
    bad.write_text("trainer:\n  max_steps: [1\nmodel: {}\n")
    assert names_class(["fit", "-c", str(good)], "model") and not names_class(["fit", "-c", str(good)], "data")
    with pytest.raises(ValueError, match=r"bad\.yaml, line 3, column 6: not valid YAML \(expected ','") as caught:
        names_class(["fit", "-c", str(good), f"--config={bad}"], "data")
    assert "\n" not in str(caught.value)


def fit_config(devices, batch_size: int, num_generations: int, num_nodes: int = 1) -> Namespace:
    return Namespace(
        trainer=Namespace(devices=devices, num_nodes=num_nodes),
        model=Namespace(algo=Namespace(num_generations=num_generations)),
        data=Namespace(batch_size=batch_size),
    )


def test_rollout_rows_that_do_not_split_over_the_processes_are_refused_before_any_starts():
    with pytest.raises(ValueError, match=r"1 x 3 = 3 rollout rows must be divisible by the 2 processes"):
        check_config_shares(fit_config(2, batch_size=1, num_generations=3))
    with pytest.raises(ValueError, match="the 2 processes"):
        check_config_shares(fit_config("2", batch_size=1, num_generations=3))  # as --trainer.devices=2 gives it
    with pytest.raises(ValueError, match="the 4 processes"):
        check_config_shares(fit_config([0, 1], batch_size=3, num_generations=2, num_nodes=2))
    for config in (fit_config(2, 1, 4), fit_config("auto", 1, 3), fit_config("-1", 1, 3), fit_config(1, 1, 3), fit_config([0, 1, 2], 3, 1)):
        check_config_shares(config)  # even, or nothing to check before the trainer exists


def test_a_nested_parse_report_keeps_its_key_and_reasons():
    report = (
        'Parser key "trainer.callbacks":\n  - Expected a path but x.Y either not accessible or invalid\n'
        "  - Does not validate against any of the Union subtypes\n    Subtypes: [list[Callback], <class "
        "'NoneType'>]\n    Errors:\n      - Problem with given class_path 'x.Y':\n          no attribute 'Y'\n"
        "      - Problem with given class_path 'x.Y':\n          no attribute 'Y'\n      - Expected a <class "
        "'NoneType'>\n    Given value type: <class 'str'>\n    Given value: x.Y"
    )
    assert user_message(ValueError(report)) == (
        "trainer.callbacks: Expected a path but x.Y either not accessible or invalid; Problem with given "
        "class_path 'x.Y': no attribute 'Y' (got x.Y)"
    )
