"""catdog.tracking against real sqlite MLflow stores in tmp dirs."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from catdog import tracking
from catdog.core import lifecycle
from catdog.core.errors import CatdogError
from catdog.core.lifecycle import StageStopped
from catdog.core.paths import Paths
from catdog.data import integrity
from catdog.serving import pyfunc
from catdog.tracking import study
from catdog.tracking.copies import derive_run

from conftest import build_params, client_for, jpeg_bytes, read_csv, run_id, seed_store


@pytest.fixture
def params():
    return build_params(
        {"data.source": "data/raw/train.zip", "train.lr": 0.005, "tracking.experiment_name": "catdog-tracking-test"}
    )


def metric_history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


# --- where the store is ------------------------------------------------------------------------


def test_default_uri_is_sqlite_file_in_the_project_root(tmp_path, monkeypatch):
    assert tracking.tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.chdir(tmp_path)
    uri = tracking.tracking_uri(Path("."))
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert uri.startswith("sqlite:////")  # absolute: four slashes


def test_env_tracking_uri_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/other.db")
    assert tracking.tracking_uri(tmp_path / "project") == f"sqlite:///{tmp_path}/other.db"


def test_dvc_root_redirects_the_store(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "repo"))
    temp_copy = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "abc"
    assert tracking.store_root(temp_copy) == (tmp_path / "repo").resolve()
    assert tracking.tracking_uri(temp_copy) == f"sqlite:///{(tmp_path / 'repo').resolve()}/mlflow.db"


# --- start_run ---------------------------------------------------------------------------------


def test_start_run_creates_run_with_params_and_tags(mlflow_store, mlflow_client, tmp_path, params):
    paths = Paths.under(tmp_path)
    paths.manifest.parent.mkdir(parents=True)
    paths.manifest.write_text("path,label,split,pixel_md5\ntrain/cat.1.jpg,cat,train,abc\n")
    paths.images.write_bytes(b"pixels")
    integrity.record(paths, ["cat", "dog"])
    with tracking.start_run(params, paths) as run:
        run.log_metrics("val", {"accuracy": 0.5}, step=1)
        run.log_metrics("val", {"accuracy": 0.75}, step=2)
    run_id = run.run_id
    assert not (tmp_path / "models").exists()  # no run id in a file: runs are found by checkpoint md5

    client = mlflow_client(mlflow_store)
    logged = client.get_run(run_id)
    assert logged.info.status == "FINISHED"
    assert client.get_experiment(logged.info.experiment_id).name == "catdog-tracking-test"

    p = logged.data.params
    assert p["train.lr"] == "0.005"
    assert p["train.arch"] == params.train.arch
    assert p["train.weights"] == "null"
    assert p["data.source"] == "data/raw/train.zip"
    assert p["data.cache_size"] == "64"
    assert p["tracking.experiment_name"] == "catdog-tracking-test"
    assert json.loads(p["catdog.classes"]) == ["cat", "dog"]  # as prepare recorded them, in output order
    assert set(p) == {*params.flat("data", "train", "tracking"), "catdog.classes"}  # evaluate/export: later stages

    tags = logged.data.tags
    assert tags["data.hash"] == hashlib.md5(paths.prepared_content.read_bytes()).hexdigest()
    assert tags["catdog.params_hash"] == tracking.params_hash(params)
    assert len(tags["catdog.params_hash"]) == 32
    assert "dvc.exp_name" not in tags
    assert "mlflow.source.git.commit" not in tags  # tmp_path is no git repository
    assert logged.info.run_name == f"{params.train.arch}-features-{tracking.params_hash(params)[:6]}"
    assert metric_history(client, run_id, "val/accuracy") == [(1, 0.5), (2, 0.75)]


def test_every_run_logs_the_prepared_data_as_an_mlflow_dataset(mlflow_store, tmp_path, params):
    paths = Paths.under(tmp_path)
    paths.manifest.parent.mkdir(parents=True)
    paths.manifest.write_text(
        "path,label,split,pixel_md5\n"
        + "".join(
            f"train/{label}.{i}.jpg,{label},{split},{i}\n"
            for i, (label, split) in enumerate(
                [("cat", "train")] * 2 + [("dog", "train"), ("Golden Retriever", "val"), ("cat", "test")]
            )
        )
    )
    (paths.prepared / "images.npy").write_bytes(b"pixels")
    paths.checkpoint.parent.mkdir(parents=True)
    paths.checkpoint.write_bytes(b"weights")
    with tracking.start_run(params, paths) as run:
        run.log_params({"evaluate.batch_size": 99})
        run.record_checkpoint(paths.checkpoint)
    with tracking.stage_run(params, paths, "evaluate") as derived:  # evaluate.batch_size 16: a new run
        pass
    assert derived.run_id != run.run_id
    client = client_for(mlflow_store)
    for shown_id in (run.run_id, derived.run_id):  # a derived run shows the same data
        (logged,) = client.get_run(shown_id).inputs.dataset_inputs
        dataset = logged.dataset
        assert dataset.name == "train.zip" and dataset.digest == tracking.prepared_digest(paths)
        assert dataset.digest.endswith(".dir") and len(dataset.digest) == 36
        assert json.loads(dataset.profile) == {
            "images": 5,
            "train": 3,
            "val": 1,
            "test": 1,
            "per_class": {"train": {"cat": 2, "dog": 1}, "val": {"Golden Retriever": 1}, "test": {"cat": 1}},
        }
        assert json.loads(dataset.source)["uri"] == str(tmp_path / "data" / "raw" / "train.zip")
        assert {t.key: t.value for t in logged.tags}["mlflow.data.context"] == "training"
    # with a dvc.lock, the digest is the md5 DVC recorded for prepare's output
    (tmp_path / "dvc.lock").write_text(
        "stages:\n  prepare:\n    outs:\n    - path: data/prepared\n      md5: 0123456789abcdef0123456789abcdef.dir\n"
    )
    assert tracking.prepared_digest(paths) == "0123456789abcdef0123456789abcdef.dir"


def test_start_run_without_manifest_has_no_data_hash(mlflow_store, tmp_path, params):
    paths = Paths.under(tmp_path)
    with tracking.start_run(params, paths) as run:
        pass
    tags = client_for(mlflow_store).get_run(run.run_id).data.tags
    assert "data.hash" not in tags
    assert "catdog.params_hash" in tags


def test_dvc_experiment_name_is_tag_and_run_name(mlflow_store, tmp_path, params, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "gusty-lamb")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "0123abcd")
    with tracking.start_run(params, Paths.under(tmp_path)) as run:
        pass
    logged = client_for(mlflow_store).get_run(run.run_id)
    assert logged.data.tags["dvc.exp_name"] == "gusty-lamb"
    assert logged.data.tags["dvc.baseline_rev"] == "0123abcd"
    assert logged.info.run_name == "gusty-lamb"


def test_a_tune_trial_run_is_a_child_of_its_study_run(mlflow_store, tmp_path, params, monkeypatch):
    """catdog tune passes the parent in CATDOG_PARENT_RUN_ID; a run derived from the trial's takes the
    parent of its own process, not its source's."""
    root = tmp_path
    parent = study.open_study_run(root, params.tracking.experiment_name, "s", "train.lr: [0.1]\n", {"k": "v"})
    assert study.open_study_run(root, params.tracking.experiment_name, "s", "", {}) == parent  # found, not new
    monkeypatch.setenv("CATDOG_PARENT_RUN_ID", parent)
    with tracking.start_run(params, Paths.under(root)) as run:
        pass
    store = client_for(mlflow_store)
    assert store.get_run(run.run_id).data.tags["mlflow.parentRunId"] == parent
    monkeypatch.delenv("CATDOG_PARENT_RUN_ID")
    derived = derive_run(store, run.run_id, drop=set())
    assert "mlflow.parentRunId" not in store.get_run(derived).data.tags
    logged = store.get_run(parent)
    assert logged.data.tags["catdog.study"] == "s" and logged.data.tags["k"] == "v"
    assert logged.info.status == "RUNNING"
    summary = {"study": "s", "best": {"experiment": "s-0", "value": 0.5, "params": {"train.lr": 0.1}}}
    study.record_study(root, parent, {**summary, "trials": {"complete": 1}}, "val_loss", {}, "number,value\n0,0.5\n")
    study.end_study_run(root, parent)
    logged = store.get_run(parent)
    assert logged.data.metrics["best_val_loss"] == 0.5 and logged.data.tags["catdog.best.train.lr"] == "0.1"
    assert logged.info.status == "FINISHED"
    assert {a.path for a in store.list_artifacts(parent)} == {"search_space.yaml", "study.json", "trials.csv"}


def test_params_hash_changes_with_any_param():
    a = build_params({"data.source": "x"})
    b = build_params({"data.source": "x", "evaluate.batch_size": 7})
    assert tracking.params_hash(a) == tracking.params_hash(build_params({"data.source": "x"}))
    assert tracking.params_hash(a) != tracking.params_hash(b)


def test_git_commit_and_dirty_tags(mlflow_store, tmp_path, params):
    if shutil.which("git") is None:
        pytest.skip("git not installed")
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "params.yaml").write_text("a: 1\n")
    (tmp_path / "README.md").write_text("hello\n")
    subprocess.run([*git, "add", "params.yaml", "README.md"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "init"], cwd=tmp_path, check=True)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.strip()
    paths = Paths.under(tmp_path)
    with tracking.start_run(params, paths) as clean:
        pass
    (tmp_path / "README.md").write_text("docs only: no effect on the model\n")
    with tracking.start_run(params, paths) as docs:
        pass
    (tmp_path / "params.yaml").write_text("a: 2\n")
    with tracking.start_run(params, paths) as dirty:
        pass
    client = client_for(mlflow_store)
    assert client.get_run(clean.run_id).data.tags["mlflow.source.git.commit"] == head
    assert client.get_run(clean.run_id).data.tags["git.dirty"] == "False"
    assert client.get_run(docs.run_id).data.tags["git.dirty"] == "False"  # only code and params count
    assert client.get_run(dirty.run_id).data.tags["git.dirty"] == "True"


def test_env_tracking_uri_store_is_used(mlflow_template, tmp_path, params, monkeypatch):
    db = seed_store(mlflow_template, tmp_path / "elsewhere")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is relative to the cwd
    project = tmp_path / "project"
    with tracking.start_run(params, Paths.under(project)) as run:
        pass
    assert client_for(db).get_run(run.run_id).info.run_id == run.run_id
    assert not (project / "mlflow.db").exists()


def test_dvc_root_store_is_used(mlflow_template, tmp_path, params, monkeypatch):
    repo = tmp_path / "repo"
    db = seed_store(mlflow_template, repo)
    monkeypatch.setenv("DVC_ROOT", str(repo))
    temp_copy = repo / ".dvc" / "tmp" / "exps" / "run1"
    with tracking.start_run(params, Paths.under(temp_copy)) as run:
        pass
    assert client_for(db).get_run(run.run_id).info.status == "FINISHED"
    assert not (temp_copy / "mlflow.db").exists()


def test_new_experiment_keeps_artifacts_beside_the_default_store(mlflow_template, tmp_path, params, monkeypatch):
    project = tmp_path / "project"
    seed_store(mlflow_template, project)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # e.g. a stage started with --root from another directory
    note = tmp_path / "note.txt"
    note.write_text("hi\n")
    with tracking.start_run(params, Paths.under(project)) as run:
        run.log_artifact(note, "reports")
    client = client_for(project)
    experiment = client.get_experiment(client.get_run(run.run_id).info.experiment_id)
    assert experiment.artifact_location == (project / "mlruns").resolve().as_uri()
    assert list((project / "mlruns").rglob("note.txt"))
    assert not (elsewhere / "mlruns").exists()


def test_queued_experiment_logs_artifacts_into_the_real_repository(mlflow_template, tmp_path, params, monkeypatch):
    repo = tmp_path / "repo"
    db = seed_store(mlflow_template, repo)
    temp_copy = repo / ".dvc" / "tmp" / "exps" / "run1"
    temp_copy.mkdir(parents=True)
    monkeypatch.setenv("DVC_ROOT", str(repo))
    monkeypatch.chdir(temp_copy)  # where DVC runs a queued experiment's stages
    note = temp_copy / "note.txt"
    note.write_text("hi\n")
    with tracking.start_run(params, Paths.under(temp_copy)) as run:
        run.log_artifact(note, "reports")
    client = client_for(db)
    experiment = client.get_experiment(client.get_run(run.run_id).info.experiment_id)
    assert experiment.artifact_location == (repo / "mlruns").resolve().as_uri()
    assert not (temp_copy / "mlruns").exists()


def test_tracking_uri_follows_the_project_root_within_one_process(mlflow_template, tmp_path, params):
    first, second = tmp_path / "first", tmp_path / "second"
    seed_store(mlflow_template, first)
    seed_store(mlflow_template, second)
    with tracking.start_run(params, Paths.under(first)):
        pass
    assert tracking.tracking_uri(second) == f"sqlite:///{second.resolve()}/mlflow.db"


def test_experiment_is_reused(mlflow_store, tmp_path, params):
    paths = Paths.under(tmp_path)
    with tracking.start_run(params, paths) as first:
        pass
    with tracking.start_run(params, paths) as second:
        pass
    client = client_for(mlflow_store)
    assert first.run_id != second.run_id
    assert client.get_run(first.run_id).info.experiment_id == client.get_run(second.run_id).info.experiment_id


def test_log_artifact_of_a_missing_file_is_an_error(mlflow_store, tmp_path, params):
    paths = Paths.under(tmp_path)
    report = tmp_path / "reports" / "note.txt"
    report.parent.mkdir()
    report.write_text("hello\n")
    with tracking.start_run(params, paths) as run:
        run.log_artifact(report, "reports")
        with pytest.raises(CatdogError, match=r"missing\.png.*not there"):
            run.log_artifact(tmp_path / "missing.png", "plots")
    artifacts = [a.path for a in client_for(mlflow_store).list_artifacts(run.run_id, "reports")]
    assert artifacts == ["reports/note.txt"]


def test_a_stop_hidden_by_a_failing_clean_up_still_ends_the_run_killed(mlflow_store, tmp_path, params):
    """torch.save's zip writer, stopped mid-record, fails as the stop unwinds through it ("unexpected
    pos", seen in CI): the run is still KILLED by the stop, not FAILED by that error."""

    class FailingClose:
        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")

    with pytest.raises(StageStopped), tracking.start_run(params, Paths.under(tmp_path)) as run, FailingClose():
        raise StageStopped(signal.SIGTERM)
    stopped = client_for(mlflow_store).get_run(run.run_id)
    assert stopped.info.status == "KILLED" and stopped.data.tags["catdog.stopped"] == "SIGTERM during train"
    assert lifecycle.stop_behind(RuntimeError("no stop behind it")) is None


# --- one pipeline run per checkpoint: record_checkpoint, stage_run -------------------------------


@pytest.fixture
def train_run(mlflow_store, tmp_path, params):
    """A finished train run with a metric history and its checkpoint, as the train stage leaves them."""
    paths = Paths.under(tmp_path)
    paths.checkpoint.parent.mkdir(parents=True)
    paths.checkpoint.write_bytes(b"weights v1")
    with tracking.start_run(params, paths) as run:
        for epoch in (1, 2, 3):
            run.log_metrics("val", {"accuracy": 0.5 + epoch / 10, "loss": 1.0 / epoch}, step=epoch)
        run.set_tags({"custom.note": "from train"})
        run.record_checkpoint(paths.checkpoint)
    return paths, run.run_id


def _runs(mlflow_store, run_id: str) -> list:
    client = client_for(mlflow_store)
    return client.search_runs([client.get_run(run_id).info.experiment_id])


def test_stages_log_into_the_run_of_their_checkpoint(train_run, mlflow_store, params):
    paths, train_id = train_run
    for stage in ("evaluate", "export"):
        with tracking.stage_run(params, paths, stage) as run:
            run.log_metrics("test" if stage == "evaluate" else "export", {"figure": 0.9})
        assert run.run_id == train_id
    logged = client_for(mlflow_store).get_run(train_id).data
    assert logged.tags["catdog.checkpoint_md5"] == hashlib.md5(b"weights v1").hexdigest()
    assert {logged.tags[f"catdog.results.{s}"] for s in ("train", "evaluate", "export")} == {"logged"}
    assert logged.params["evaluate.batch_size"] == "16" and logged.params["export.opset"] == "18"
    assert logged.metrics["test/figure"] == logged.metrics["export/figure"] == 0.9
    assert len(_runs(mlflow_store, train_id)) == 1


def test_a_stage_rerun_starts_a_run_with_the_full_results(train_run, mlflow_store, params):
    """Only evaluate params changed: DVC reruns evaluate alone; its new run copies train's results."""
    paths, train_id = train_run
    with tracking.stage_run(params, paths, "evaluate") as run:
        run.log_metrics("test", {"accuracy": 0.9})
    changed = build_params(
        {**{k: v for k, v in params.flat().items() if k != "evaluate.batch_size"}, "evaluate.batch_size": 32}
    )
    with tracking.stage_run(changed, paths, "evaluate") as run:
        run.log_metrics("test", {"accuracy": 0.8})
    derived_id = run.run_id
    assert derived_id != train_id

    client = client_for(mlflow_store)
    source, derived = client.get_run(train_id), client.get_run(derived_id)
    assert derived.data.tags["catdog.reused_from"] == train_id
    assert derived.data.tags["catdog.results.train"] == "copied"
    assert derived.data.tags["catdog.results.evaluate"] == "logged"
    assert derived.data.tags["catdog.checkpoint_md5"] == source.data.tags["catdog.checkpoint_md5"]
    assert derived.data.tags["catdog.params_hash"] == tracking.params_hash(changed)
    assert derived.data.tags["custom.note"] == "from train"
    assert derived.info.run_name == f"{source.info.run_name}-re"
    assert derived.data.params["evaluate.batch_size"] == "32"
    assert source.data.params["evaluate.batch_size"] == "16"  # immutable in the source
    assert {k: v for k, v in derived.data.params.items() if k != "evaluate.batch_size"} == {
        k: v for k, v in source.data.params.items() if k != "evaluate.batch_size"
    }
    # the whole per-epoch history, not only the last values
    assert metric_history(client, derived_id, "val/accuracy") == [(1, 0.6), (2, 0.7), (3, 0.8)]
    assert derived.data.metrics["test/accuracy"] == 0.8 and source.data.metrics["test/accuracy"] == 0.9
    # export then finds the new run, the most recent one of the checkpoint, and completes it
    with tracking.stage_run(changed, paths, "export") as run:
        pass
    assert run.run_id == derived_id


def test_an_identical_checkpoint_copies_the_downstream_results(train_run, mlflow_store, params):
    """`dvc repro -f -s train` gives the same checkpoint: DVC will not rerun evaluate and export."""
    paths, first_id = train_run
    for stage in ("evaluate", "export"):
        with tracking.stage_run(params, paths, stage) as run:
            run.log_metrics("test", {"accuracy": 0.9})
    with tracking.start_run(params, paths) as run:
        run.log_metrics("val", {"accuracy": 0.7}, step=1)
        run.record_checkpoint(paths.checkpoint)
    client = client_for(mlflow_store)
    again = client.get_run(run.run_id).data
    assert run.run_id != first_id
    assert again.tags["catdog.reused_from"] == first_id
    assert again.tags["catdog.results.train"] == "logged"
    assert again.tags["catdog.results.evaluate"] == again.tags["catdog.results.export"] == "copied"
    assert again.params["evaluate.batch_size"] == "16" and again.metrics["test/accuracy"] == 0.9
    assert metric_history(client, run.run_id, "val/accuracy") == [(1, 0.7)]  # its own, not copied
    # a forced evaluate rerun with the same params completes that run instead of starting another
    with tracking.stage_run(params, paths, "evaluate") as evaluate:
        evaluate.log_metrics("test", {"accuracy": 0.9})
    assert evaluate.run_id == run.run_id
    assert client.get_run(run.run_id).data.tags["catdog.results.evaluate"] == "logged"
    assert len(_runs(mlflow_store, first_id)) == 2


def test_a_stage_without_a_run_of_its_checkpoint_says_what_to_do(train_run, params):
    paths, _ = train_run
    paths.checkpoint.write_bytes(b"weights nobody logged")
    with (
        pytest.raises(CatdogError, match=r"no MLflow run of checkpoint.pt .*dvc repro -f -s train"),
        tracking.stage_run(params, paths, "evaluate"),
    ):
        pass


def test_a_derived_run_copies_long_metric_histories(train_run, mlflow_store, params):
    from mlflow.entities import Metric

    paths, train_id = train_run
    client = client_for(mlflow_store)
    client.log_batch(
        train_id, metrics=[Metric("step_loss", float(i), 1_700_000_000_000 + i, i) for i in range(950)]
    )  # more than one 900-metric batch
    client.set_tag(train_id, "catdog.results.evaluate", "logged")
    with tracking.stage_run(params, paths, "evaluate") as derived:
        pass
    assert derived.run_id != train_id
    history = metric_history(client, derived.run_id, "step_loss")
    assert len(history) == 950
    assert history[0] == (0, 0.0) and history[-1] == (949, 949.0)


# --- model registry ----------------------------------------------------------------------------


def _tiny_export(folder: Path) -> dict[str, Path]:
    """An exported-model folder: a 2-class ONNX model on 8x8 RGB input, its labels and preprocessing."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.array([[1, -1], [0, 0], [-1, 1]], dtype=np.float32), "weights")
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"]),
            helper.make_node("MatMul", ["flat", "weights"], ["logits"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])],
        [weights],
    )
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(folder / "model.onnx"))
    (folder / "labels.json").write_text('{"classes": ["cat", "dog"]}\n')
    (folder / "preprocess.json").write_text('{"cache_size": 8, "image_size": 8}\n')
    return {
        "onnx_model": folder / "model.onnx",
        "labels": folder / "labels.json",
        "preprocess": folder / "preprocess.json",
    }


def test_pyfunc_model_moves_champion_only_on_improvement_on_the_same_test_images(mlflow_store, tmp_path, params):
    (tmp_path / "code").mkdir()
    model = pyfunc.pyfunc_model(
        _tiny_export(tmp_path / "export"), ["cat", "dog"], jpeg_bytes("cat", 1), tmp_path / "code"
    )
    sample, full = "sample-test-set", "full-test-set"
    steps = [(0.90, sample, True), (0.80, sample, True), (0.95, sample, False), (0.95, sample, True)]
    steps += [(0.95, sample, True), (0.99, full, True), (0.99, full, False)]
    registrations = []
    with tracking.start_run(params, Paths.under(tmp_path)) as run:
        for accuracy, test_set, promote in steps:
            score = tracking.Score(accuracy, test_set)
            registrations.append(run.log_pyfunc_model(model, "catdog-test", score, promote))
        assert run.log_pyfunc_model(model, None, tracking.Score(0.99, sample), True) is None
    assert [r.version for r in registrations] == ["1", "2", "3", "4", "5", "6", "7"]
    # first is champion; worse is not; not asked to promote; better; a tie is no improvement;
    # better on other test images is not comparable: the champion stays, and the registration says
    # why (unless promotion is off)
    assert [r.promoted for r in registrations] == [True, False, False, True, False, False, False]
    assert [r.incomparable_champion for r in registrations] == [None] * 5 + ["4", None]
    client = client_for(mlflow_store)
    assert str(client.get_model_version_by_alias("catdog-test", "champion").version) == "4"
    assert str(client.get_model_version_by_alias("catdog-test", "candidate").version) == "7"
    assert client.get_model_version("catdog-test", "2").tags["test_accuracy"] == "0.8"
    assert client.get_model_version("catdog-test", "6").tags["test_set"] == full
    assert client.get_model_version("catdog-test", "1").run_id == run.run_id
    assert len(client.search_model_versions("name = 'catdog-test'")) == 7  # no name: logged, not registered


# --- metric keys of the whole pipeline's run ----------------------------------------------------


def test_mlflow_metrics_are_grouped_by_section_and_facts_are_tags(pipeline):
    """The run page charts metrics by the prefix before "/"; counts, versions, flags are no metrics."""
    run = client_for(pipeline.root).get_run(run_id(pipeline.paths))
    metrics = set(run.data.metrics)
    assert not [key for key in metrics if "/" not in key], sorted(metrics)
    assert {key.split("/")[0] for key in metrics} <= {"train", "val", "test", "export", "schedule", "system"}
    assert {
        "train/loss",
        "train/accuracy",
        "val/loss",
        "val/accuracy",
        "schedule/lr",
        "test/accuracy",
        "test/log_loss",
        "test/roc_auc",
        "test/f1",
        "test/ece",
        "test/precision_cat",
        "test/recall_dog",
        "export/onnx_max_abs_diff",
        "export/pt2_max_abs_diff",
    } <= metrics, sorted(metrics)
    assert not metrics & {"test/n", "export/parity_images", "export/registered_version"}
    tags = run.data.tags
    assert tags["catdog.test_images"] == str(len(read_csv(pipeline.paths.evaluate_reports / "predictions.csv")))
    assert tags["catdog.parity_images"] == "10" and tags["catdog.epochs_trained"] == "3"
    assert (tags["catdog.registered_version"], tags["catdog.promoted_champion"]) == ("1", "True")
