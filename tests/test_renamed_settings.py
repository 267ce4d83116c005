"""A renamed setting keeps its old name (``Config.RENAMED``): in a profile section, ``--set``, ``NB.KEY`` and a
notebook's ``overrides`` it maps to the new field with one deprecation warning; old and new together are an error."""
import warnings

import pytest

from covidkit.profiles import ProfileError, load_profile, notebooks_dir
from covidkit.stages import notebook_of, section_parameters, stage_module


def _deprecations(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)
            and "is deprecated: use" in str(w.message)]


@pytest.fixture
def old_names_profile(tmp_path, monkeypatch):
    """A profile that still uses the old names of 10's ``output_size`` and 11's ``lung_input_size``."""
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "old.yaml").write_text(
        "common:\n  seed: 7\n10_ct_cogseg:\n  size: 96\n  epochs: 2\n11_ct_decovnet:\n  lung_size: 48\n")
    monkeypatch.setenv("COVIDKIT_NOTEBOOKS", str(tmp_path))
    return "old"


def test_an_old_name_in_a_profile_section_fills_the_new_field_and_warns(old_names_profile):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        params = section_parameters(old_names_profile, "10")
    assert params == {"seed": 7, "output_size": 96, "epochs": 2}
    assert _deprecations(caught) == ["10_ct_cogseg.size is deprecated: use output_size"]
    cfg = stage_module("10").Config.from_params(params)
    assert cfg.output_size == 96 and cfg.ablation("medseg").output_size == 96  # and the method's own config
    with pytest.warns(DeprecationWarning, match=r"^11_ct_decovnet\.lung_size is deprecated: use lung_input_size$"):
        decov = stage_module("11").Config.from_params(section_parameters(old_names_profile, "11"))
    assert decov.lung_input_size == 48 and decov.method().lung_input_size == 48


def test_an_old_name_given_with_set_fills_the_new_field_and_warns():
    for stage in ("03", "04"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            params = section_parameters("smoke", stage, {"splits": [1]})
        config = stage_module(stage).Config
        assert params["train_folds"] == [1] and "splits" not in params and config.from_params(params).train_folds == [1]
        assert _deprecations(caught) == [f"{notebook_of(stage)}.splits is deprecated: use train_folds"]
    # a notebook's own overrides (its parameters cell)
    with pytest.warns(DeprecationWarning, match="11_ct_decovnet.lung_size is deprecated"):
        cfg = stage_module("11").Config.from_namespace({"profile": None, "overrides": {"lung_size": 40}})
    assert cfg.lung_input_size == 40


def test_old_and_new_name_together_are_an_error_naming_both(old_names_profile):
    with pytest.raises(ProfileError, match=r"03_train_siim_fasterrcnn sets both splits and train_folds"):
        section_parameters(old_names_profile, "03", {"splits": [0], "train_folds": [1]})
    with pytest.raises(ProfileError, match=r"sets both lung_size and lung_input_size"):
        stage_module("11").Config.from_namespace({"profile": None, "overrides": {"lung_size": 40,
                                                                                 "lung_input_size": 40}})
    # the profile's old name and a --set of the new one: the command line wins, as for any setting
    with pytest.warns(DeprecationWarning):
        assert section_parameters(old_names_profile, "10", {"output_size": 64})["output_size"] == 64


def test_the_pipeline_passes_the_new_name_to_the_notebook_and_its_record():
    """``covidkit pipeline --set 03.splits=[1]``: accepted, and the notebook (and the stage's record) gets
    ``train_folds``; 00's own ``folds`` (how many K folds) is set as it always was."""
    from covidkit.pipeline import check_settings, notebook_overrides, notebook_parameters

    books = {b.stem[:2]: b for b in notebooks_dir().glob("0[03]_*.ipynb")}
    check_settings(list(books.values()), {"03.splits": [1]})
    profile = load_profile("smoke")
    with pytest.warns(DeprecationWarning, match="03_train_siim_fasterrcnn.splits is deprecated: use train_folds"):
        params = notebook_parameters(books["03"], profile, notebook_overrides(books["03"].stem, {"03.splits": [1]}))
    assert params["overrides"]["train_folds"] == [1] and "splits" not in params["overrides"]
    params = notebook_parameters(books["00"], profile, notebook_overrides(books["00"].stem, {"00.folds": 3}))
    assert params["overrides"]["folds"] == 3  # 00's folds was not renamed
    # a plain --set folds=N is 00's (its current name), not 03's old name of train_folds; splits is no stage's now
    assert notebook_overrides(books["00"].stem, {"folds": 3}) == {"folds": 3}
    assert notebook_overrides(books["03"].stem, {"folds": 3}) == {}
    assert notebook_overrides(books["03"].stem, {"splits": [1]}) == {"splits": [1]}


def test_the_old_names_of_the_methods_configs_and_of_the_file_hash_still_work(tmp_path):
    import hashlib

    from covidkit.ct.cogseg.ablation import AblationConfig
    from covidkit.ct.decovnet.method import DeCoVNetConfig
    from covidkit.model_file import file_sha256

    with pytest.warns(DeprecationWarning, match="AblationConfig.size is deprecated: use AblationConfig.output_size"):
        assert AblationConfig(input_dir="in", run_dir="run", size=96).output_size == 96
    with pytest.raises(ValueError, match="multiple of 32"):
        AblationConfig(input_dir="in", run_dir="run", output_size=100)
    with pytest.warns(DeprecationWarning, match="DeCoVNetConfig.lung_size is deprecated"):
        assert DeCoVNetConfig(lung_size=48).lung_input_size == 48
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(range(256)) * 5000)
    with pytest.warns(DeprecationWarning, match="export.sha256 is deprecated: use covidkit.model_file.file_sha256"):
        from covidkit.export import sha256
    assert sha256 is file_sha256 and file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_splits_and_folds_in_a_03_profile_section_are_train_folds_with_one_warning(tmp_path, monkeypatch):
    """03's and 04's fold models to train: ``train_folds``, named ``folds`` and then ``splits`` before."""
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "old.yaml").write_text(
        "00_prepare_data:\n  folds: 5\n03_train_siim_fasterrcnn:\n  fold_groups: 2\n  splits: [1]\n"
        "04_train_siim_yolo:\n  folds: [0]\n")
    monkeypatch.setenv("COVIDKIT_NOTEBOOKS", str(tmp_path))
    for stage, old, folds in (("03", "splits", [1]), ("04", "folds", [0])):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            params = section_parameters("old", stage)
        assert _deprecations(caught) == [f"{notebook_of(stage)}.{old} is deprecated: use train_folds"]
        assert params["train_folds"] == folds and old not in params
        assert stage_module(stage).Config.from_params(params).train_folds == folds
    assert section_parameters("old", "00")["folds"] == 5


def test_the_old_names_of_the_fold_functions_still_work():
    import pandas as pd

    from covidkit import folds
    from covidkit.engine import kfold

    with pytest.warns(DeprecationWarning, match=r"^covidkit.folds.validation_splits is deprecated: use "
                                                r"covidkit.folds.model_folds$"):
        validation_splits = folds.validation_splits
    assert validation_splits is folds.model_folds
    assert validation_splits(pd.Series([0, 1, 2, 3, 4]), 2).tolist() == [0, 1, 0, 1, 0]
    with pytest.warns(DeprecationWarning, match="covidkit.engine.kfold.splits_to_run is deprecated"):
        from covidkit.engine.kfold import splits_to_run
    assert splits_to_run is kfold.folds_to_run
    table = kfold.fold_table(pd.DataFrame({"fold": [0, 1, 2, 3, 4], "label": ["a"] * 5}), 2)
    assert table["model_fold"].tolist() == [0, 1, 0, 1, 0] and kfold.folds_to_run(table) == [0, 1]


def test_a_fold_run_checkpointed_under_an_old_name_resumes_under_train_folds():
    """03's engine runs fingerprint every setting (``hparams``): one checkpointed while 03's ``train_folds`` was
    named ``splits`` (or ``folds``) resumes now; the ``split`` key (the fold a run holds out) is unchanged."""
    from covidkit.engine.config import config_differences

    saved = {"run_dir": "r", "epochs": 2, "hparams": {"lr": 0.01, "splits": None, "split": 1}}
    assert config_differences(saved, saved | {"hparams": {"lr": 0.01, "train_folds": None, "split": 1}}) == []
    assert config_differences(saved, saved | {"hparams": {"lr": 0.01, "train_folds": None, "split": 0}})


def test_a_number_for_train_folds_is_an_error_that_points_at_00s_folds():
    """``--set folds=3`` reaches 00's ``folds`` (how many) and, by its old name, 03's ``train_folds`` (which): the
    stage says so before it trains, instead of failing deep inside."""
    for stage in ("03", "04"):
        config = stage_module(stage).Config
        with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match=r"--set 00\.folds=N"):
            config.from_params(section_parameters("smoke", stage, {"folds": 3}))
        with pytest.raises(ValueError, match="list of folds to train"):
            config(train_folds=[0, "1"])
        assert config(train_folds=[1, 0]).train_folds == [1, 0] and config().train_folds is None
