"""End-to-end cm-arr-train runs on tiny synthetic stores: outputs, reproducibility, resume,
combining fold jobs, t-SNE representations, bad input, and DDP with two CPU processes."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cmarr.extract.store import FeatureStore
from cmarr.pipelines.cli.results import app as combine_app
from cmarr.pipelines.cli.train import app
from cmarr.pipelines.demo.synthetic import make_synthetic_store
from cmarr.pipelines.errors import TrainError
from cmarr.pipelines.fold import FoldRecipe
from cmarr.pipelines.reps import collect_reps
from cmarr.pipelines.train import resolve_config, run_training

torch.set_num_threads(1)
runner = CliRunner()


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_config):
    root = tmp_path_factory.mktemp("train")
    store = make_synthetic_store(root / "s.h5", n_per_class=4, sessions=3, seed=5)
    cfg = tiny_config(root / "tiny.yaml")
    return root, store, cfg


def _train(args):
    res = runner.invoke(app, [str(a) for a in args])
    return res


def _no_traceback(res):
    assert "Traceback" not in res.output and res.exception is None or isinstance(res.exception, SystemExit)


# ---------------------------------------------------------------- outputs of every variant

@pytest.mark.parametrize("variant", ["cm-arr", "baseline", "no-udcl", "no-spcl", "no-attention", "point"])
def test_cli_writes_all_outputs(env, variant):
    root, store, cfg = env
    out = root / f"run-{variant}"
    res = _train(["--features", store, "--config", cfg, "--variant", variant, "--folds", "1", "--epochs", "1",
                  "--out", out, "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "{s, v, t}" in res.output and "Avg." in res.output  # the table is printed
    for f in ("config.yaml", "model_config.yaml", "metrics.json", "results.md", "fold1/log.csv", "fold1/best.pt",
              "fold1/last.pt", "fold1/metrics.json"):
        assert (out / f).is_file(), f
    m = json.loads((out / "metrics.json").read_text())
    assert m["variant"] == variant
    f1 = m["folds"]["1"]
    assert set(f1) == {"t", "s", "v", "vt", "sv", "st", "svt", "avg"}
    for c in ("t", "s", "v", "vt", "sv", "st", "svt"):
        assert 0 <= f1[c]["war"] <= 1 and np.asarray(f1[c]["confusion"]).shape == (4, 4)
        assert np.asarray(f1[c]["confusion"]).sum() + f1[c]["n_no_input"] == m["sizes"]["1"]["test"]
    assert f1["avg"]["uar"] == pytest.approx(np.mean([f1[c]["uar"] for c in ("t", "s", "v", "vt", "sv", "st")]))
    ck = torch.load(out / "fold1" / "best.pt", map_location="cpu", weights_only=True)
    assert f1["s"]["n_reduced"] == 0  # the synthetic store never lacks speech
    assert all(f1[c]["n_reduced"] <= f1[c]["n"] for c in ("t", "s", "v", "vt", "sv", "st", "svt"))
    assert ck["provenance"]["speech"]["model"] == "synthetic" and ck["train_config"]["variant"] == variant
    with FeatureStore(store) as fs:  # the checkpoint names the exact frames it was trained on
        assert ck["store"]["frames_sha256"] == fs.checksums and all(fs.checksums.values())
    assert set(ck["split"]["test"]).isdisjoint(ck["split"]["val"])
    md = (out / "results.md").read_text()
    assert "| {v, t} |" in md


# ---------------------------------------------------------------- reproducibility and resume

def test_fixed_seed_reproduces_metrics_and_training_learns(env):
    root, store, cfg = env
    a = run_training(store, cfg, out_dir=root / "seed-a", folds=[2], device="cpu", seed=3, epochs=3, log=None)
    b = run_training(store, cfg, out_dir=root / "seed-b", folds=[2], device="cpu", seed=3, epochs=3, log=None)
    assert a["folds"] == b["folds"]
    la = (root / "seed-a" / "fold2" / "log.csv").read_text().splitlines()
    lb = (root / "seed-b" / "fold2" / "log.csv").read_text().splitlines()
    def strip(rows):  # drop the seconds column
        return [",".join(r.split(",")[:-1]) for r in rows]

    assert strip(la) == strip(lb) and len(la) == 4
    losses = [float(r.split(",")[6]) for r in la[1:]]  # loss_total column
    assert losses[-1] < losses[0]


def test_resume_after_interruption_gives_the_same_result(env):
    root, store, cfg = env
    full = run_training(store, cfg, out_dir=root / "uninterrupted", folds=[3], device="cpu", log=None)
    # interrupted: the process dies during epoch 2, after epoch 1 was checkpointed
    tcfg = resolve_config(cfg, folds=[3], device="cpu")
    from cmarr.pipelines.data import StoreData

    class Killed(FoldRecipe):
        def train_epoch(self, epoch):
            if epoch == 2:
                raise KeyboardInterrupt
            return super().train_epoch(epoch)

    out = root / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        Killed(tcfg, StoreData(store), 3, out, torch.device("cpu")).setup().fit()
    assert (out / "fold3" / "last.pt").is_file() and not (out / "fold3" / "metrics.json").exists()
    logs = []
    resumed = run_training(store, cfg, out_dir=out, folds=[3], device="cpu", log=logs.append)
    assert any("resumed after epoch 1" in s for s in logs)
    assert resumed["folds"] == full["folds"]
    def strip(p):
        return [",".join(r.split(",")[:-1]) for r in p.read_text().splitlines()]

    assert strip(out / "fold3" / "log.csv") == strip(root / "uninterrupted" / "fold3" / "log.csv")
    # a finished fold is not trained again
    logs.clear()
    run_training(store, cfg, out_dir=out, folds=[3], device="cpu", log=logs.append)
    assert any("already done" in s for s in logs)
    # a checkpoint of an earlier run format (no "format"), or with another weight layout, is refused
    ck = torch.load(out / "fold3" / "last.pt", weights_only=True)
    for name, changed, message in (("old_format", {k: v for k, v in ck.items() if k != "format"},
                                    r"last\.pt: is a checkpoint of run format 1, this version reads format 2"),
                                   ("old_layout", {**ck, "model_format": 1},
                                    r"last\.pt: holds model weights in layout 1")):
        old = root / name
        (old / "fold3").mkdir(parents=True)
        torch.save(changed, old / "fold3" / "last.pt")
        with pytest.raises(TrainError, match=message):
            run_training(store, cfg, out_dir=old, folds=[3], device="cpu", log=None)


def test_compiled_resident_training_step(env):
    """The trainer's compiled path (resident pooled batches, value checks off): one epoch runs,
    the step graph is captured, and its losses equal the eager path's on the same batches."""
    root, store, cfg = env
    from cmarr.pipelines.data import StoreData

    over = {"data.pipeline": "resident", "model.dropout": 0.0}
    eager = FoldRecipe(resolve_config(cfg, folds=[1], device="cpu", overrides=over), StoreData(store), 1,
                       root / "eager-res", torch.device("cpu")).setup()
    comp_cfg = resolve_config(cfg, folds=[1], device="cpu",
                              overrides={**over, "optim.compile": "on", "optim.compile_backend": "aot_eager"})
    comp = FoldRecipe(comp_cfg, StoreData(store), 1, root / "compiled-res", torch.device("cpu")).setup()
    assert comp.compiled is not comp.net and eager.compiled is eager.net
    b = next(comp._train_batches(1))
    got = comp.train_step(b, comp.condition_generator(1))
    ref = eager.train_step(b, eager.condition_generator(1))
    for k in ref:
        torch.testing.assert_close(got[k], ref[k])
    assert comp.train_epoch(2)["steps"] > 0


@pytest.mark.parametrize("pipeline", ["eager", "resident"])
def test_resident_batches_are_checked_once_not_every_step(env, pipeline, monkeypatch):
    """The per-step value checks are a host sync: the eager pipeline's steps run them, the
    resident pipeline's do not (its pooled tensors are checked once, when built)."""
    root, store, cfg = env
    from cmarr.pipelines.data import StoreData

    r = FoldRecipe(resolve_config(cfg, folds=[1], device="cpu", overrides={"data.pipeline": pipeline}),
                   StoreData(store), 1, root / f"checks-{pipeline}", torch.device("cpu")).setup()
    seen = []
    forward = r.model.forward
    monkeypatch.setattr(r.model, "forward", lambda *a, **kw: seen.append(kw["validate"]) or forward(*a, **kw))
    r.train_step(next(r._train_batches(1)), r.condition_generator(1))
    assert seen == [pipeline == "eager"]


def test_resident_data_refuses_pooled_steps_that_are_partly_valid(env, monkeypatch):
    root, store, cfg = env
    from cmarr.pipelines import data as D

    def half_valid(x, mask, steps):
        pooled, step_mask = pool(x, mask, steps)
        return pooled, step_mask & (torch.arange(steps) < steps // 2)

    from cmarr.model import pool_to_steps as pool
    monkeypatch.setattr("cmarr.model.pool_to_steps", half_valid)
    sd = D.StoreData(store)
    with pytest.raises(D.DataError, match="neither all valid nor all absent"):
        D.ResidentData(sd, np.arange(4), 8, torch.device("cpu"), float("nan"))


def test_combine_fold_jobs(env):
    root, store, cfg = env
    for k in (1, 2):
        assert _train(["--features", store, "--config", cfg, "--folds", str(k), "--epochs", "1", "--out",
                       root / f"job{k}", "--quiet"]).exit_code == 0
    both = run_training(store, cfg, out_dir=root / "jobs-both", folds=[1, 2], epochs=1, log=None)
    res = runner.invoke(combine_app, [str(root / "job1"), str(root / "job2"), "--out", str(root / "combined")])
    assert res.exit_code == 0, res.output
    m = json.loads((root / "combined" / "metrics.json").read_text())
    assert m["folds"] == both["folds"] and m["summary"] == both["summary"]
    assert (root / "combined" / "results.md").read_text().count("|") > 20
    bad = runner.invoke(combine_app, [str(root / "job1"), str(root / "job1"), "--out", str(root / "c2")])
    assert bad.exit_code == 2 and "fold 1 is also in another RUN_DIR" in bad.output and "Traceback" not in bad.output
    # a damaged fold result or config is a message, not a traceback
    broken = root / "job-broken"
    shutil.copytree(root / "job2", broken)
    (broken / "fold2" / "metrics.json").write_text("{")
    bad = runner.invoke(combine_app, [str(root / "job1"), str(broken), "--out", str(root / "c3")])
    assert bad.exit_code == 2 and "fold2/metrics.json: not a fold's metrics.json" in bad.output, bad.output
    (root / "a-file").write_text("x")
    bad = runner.invoke(combine_app, [str(root / "job1"), str(root / "job2"), "--out", str(root / "a-file")])
    assert bad.exit_code == 2 and "a-file" in bad.output and "Traceback" not in bad.output, bad.output
    (broken / "config.yaml").write_text("- a list\n")
    bad = runner.invoke(combine_app, [str(root / "job1"), str(broken), "--out", str(root / "c3")])
    assert bad.exit_code == 2 and "config.yaml: expected a mapping" in bad.output, bad.output


def test_a_run_is_not_continued_on_another_store(env):
    """Same utterance ids, other labels and features (e.g. a re-extraction with another
    encoder): resuming, adding folds to the RUN_DIR or reading its checkpoints is refused."""
    root, store, cfg = env
    other = make_synthetic_store(root / "other.h5", n_per_class=4, sessions=3, seed=6)
    out = root / "on-store-a"
    assert _train(["--features", store, "--config", cfg, "--folds", "1", "--epochs", "1", "--out", out,
                   "--quiet"]).exit_code == 0
    (out / "fold1" / "metrics.json").unlink()  # as if interrupted before the test evaluation
    res = _train(["--features", other, "--config", cfg, "--folds", "1", "--epochs", "1", "--out", out, "--quiet"])
    assert res.exit_code == 2 and "holds a run on another store than" in res.output, res.output
    assert "labels, folds or speakers differ" in res.output or "features differ" in res.output
    with pytest.raises(TrainError, match="was trained on another store"):
        collect_reps(out / "fold1" / "best.pt", other, fold=1)


def test_collect_reps_for_tsne(env):
    root, store, cfg = env
    ck = root / "run-cm-arr" / "fold1" / "best.pt"
    if not ck.exists():
        run_training(store, cfg, variant="cm-arr", out_dir=root / "run-cm-arr", folds=[1], epochs=1, log=None)
    reps = collect_reps(ck, store, condition="t")
    n = len(reps["labels"])
    assert n > 0 and reps["real_speech"].shape == (n, 16)
    # under {t}, speech and video are reconstructed, text is not
    assert np.isfinite(reps["recon_speech"]).all() and np.isnan(reps["recon_text"]).all()
    assert reps["recon_mask"][:, 0].all() and not reps["recon_mask"][:, 1].any()
    present_v = reps["present_mask"][:, 2]
    assert np.isfinite(reps["real_video"][present_v]).all() and np.isnan(reps["real_video"][~present_v]).all()


def test_utterances_the_store_lacks_a_modality_of_are_counted_per_condition(env):
    """An utterance without video is scored under {s, v, t} with speech and text (n_reduced),
    and not at all under {v} (n_no_input)."""
    from cmarr.pipelines.data import StoreData
    from cmarr.pipelines.demo.synthetic import SyntheticSpec

    root, _, cfg = env
    spec = SyntheticSpec(p_absent={"speech": 0.0, "text": 0.2, "video": 0.3})
    store = make_synthetic_store(root / "absent.h5", n_per_class=4, sessions=3, seed=1, spec=spec)
    r = FoldRecipe(resolve_config(cfg, device="cpu"), StoreData(store), 1, root / "absent", torch.device("cpu")).setup()
    test = [r.data.ids[i] for i in r.split.test]
    with FeatureStore(store) as fs:
        lacks = {m: {u for u in test if not fs.has(u, m)} for m in ("speech", "text", "video")}
    assert lacks["text"] and lacks["video"] and not lacks["speech"]
    m = r.evaluate("test")
    assert m["s"]["n_reduced"] == 0 and m["s"]["n_no_input"] == 0
    assert m["svt"]["n_reduced"] == len(lacks["text"] | lacks["video"]) and m["svt"]["n_no_input"] == 0
    assert m["vt"]["n_reduced"] == len(lacks["text"] ^ lacks["video"])
    assert m["vt"]["n_no_input"] == len(lacks["text"] & lacks["video"])
    assert m["v"]["n_no_input"] == len(lacks["video"]) and m["v"]["n_reduced"] == 0
    for c in ("t", "s", "v", "vt", "sv", "st", "svt"):
        assert m[c]["n"] + m[c]["n_no_input"] == len(test)


def test_evaluation_never_reads_missing_inputs(env):
    """Unavailable inputs are NaN in evaluation; logits stay finite in all seven conditions."""
    root, store, cfg = env
    from cmarr.pipelines.data import StoreData

    r = FoldRecipe(resolve_config(cfg, device="cpu"), StoreData(store), 1, root / "leak", torch.device("cpu")).setup()
    seen = []
    orig = r.model.forward

    def spy(feats, masks, available, **kw):
        for j, m in enumerate(("speech", "text", "video")):
            hidden = ~available[:, j]
            if hidden.any():
                seen.append(bool(torch.isnan(feats[m][hidden]).all()))
        out = orig(feats, masks, available, **kw)
        assert torch.isfinite(out.logits).all()
        return out

    r.model.forward = spy
    preds = r.predict("test")
    assert set(preds) == {"t", "s", "v", "vt", "sv", "st", "svt"}
    assert seen and all(seen)


# ---------------------------------------------------------------- bad input

def _edit_store(src, dst, edit, rewrite_table):
    shutil.copy(src, dst)
    rewrite_table(dst, edit)
    return dst


@pytest.mark.parametrize("case,message", [
    ("no-labels", "has no labels"),
    ("no-folds", "has no folds"),
    ("bad-labels", "outside the four classes"),
    ("empty-fold", "fold 7 has no test utterances"),
    ("no-video", "no video features at all"),
    ("unknown-key", "optim: unknown key 'learning_rate'"),
    ("wrong-type", "optim.batch_size: expected int"),
    ("missing-file", "no such file"),
    ("negative-seed", "seed must be >= 0"),
    ("bad-betas", "optim.betas must be two numbers in [0, 1)"),
    ("dims-override", "model.num_classes is not a setting"),
    ("shard-store", "is shard 1/2 of an extraction"),
    ("out-is-a-file", "is a file, not a directory"),
    ("duplicate-folds", "names a fold more than once"),
    ("no-test-video", "fold 1: no test utterance has any input under condition v"),
    ("altered-frames", "speech: the frames do not match the checksum recorded"),
    ("altered-frames-lazy", "speech: the frames do not match the checksum recorded"),
])
def test_bad_input_is_a_clear_message(env, case, message, rewrite_table):
    root, store, cfg = env
    d = root / "bad"
    d.mkdir(exist_ok=True)
    args = ["--features", store, "--config", cfg, "--out", d / f"out-{case}", "--epochs", "1"]
    if case == "no-labels":
        args[1] = _edit_store(store, d / "nolab.h5", lambda df: df.drop(columns=["label"]), rewrite_table)
    elif case == "no-folds":
        args[1] = _edit_store(store, d / "nofold.h5", lambda df: df.drop(columns=["fold"]), rewrite_table)
    elif case == "bad-labels":
        args[1] = _edit_store(store, d / "badlab.h5", lambda df: df.assign(label=["exc"] * len(df)), rewrite_table)
    elif case == "empty-fold":
        args += ["--folds", "7"]
    elif case == "no-video":
        args[1] = make_synthetic_store(d / "nov.h5", n_per_class=2, sessions=2, modalities=("speech", "text"))
    elif case == "unknown-key":
        (d / "k.yaml").write_text("optim:\n  learning_rate: 0.1\n")
        args[3] = d / "k.yaml"
    elif case == "wrong-type":
        (d / "t.yaml").write_text("optim:\n  batch_size: sixteen\n")
        args[3] = d / "t.yaml"
    elif case == "missing-file":
        args[1] = d / "nope.h5"
    elif case == "negative-seed":
        args += ["--seed", "-1"]
    elif case == "bad-betas":
        args += ["--set", "optim.betas=[0.9, 2.0]"]
    elif case == "dims-override":
        args += ["--set", "model.num_classes=3"]
    elif case == "shard-store":
        shard = shutil.copy(store, d / "f.shard-1-of-2.h5")
        with h5py.File(shard, "a") as f:
            f.attrs["shard"] = "1/2"
        args[1] = shard
    elif case == "out-is-a-file":
        (d / "afile").write_text("x")
        args[5] = d / "afile"
    elif case == "duplicate-folds":
        args += ["--folds", "1,2,1"]
    elif case in ("altered-frames", "altered-frames-lazy"):
        altered = shutil.copy(store, d / f"{case}.h5")
        with h5py.File(altered, "a") as f:
            f["features"]["speech"]["data"][0, 0] += 1
        args[1] = altered
        if case.endswith("lazy"):
            args += ["--set", "data.load=lazy"]
    elif case == "no-test-video":  # found before the fold trains (50 epochs would take long)
        args[1] = make_synthetic_store(d / "novid1.h5", n_per_class=3, sessions=3, seed=2, absent_folds={"video": [1]})
        args += ["--folds", "1", "--epochs", "50"]
    res = _train(args)
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert "Traceback" not in res.output
    if case in ("unknown-key", "wrong-type"):
        assert str(args[3]) in res.output  # names the file


# ---------------------------------------------------------------- distributed data parallel

def test_ddp_two_cpu_processes_gloo(env, tmp_path):
    root, store, cfg = env
    script = tmp_path / "ddp_run.py"
    script.write_text(
        "import hashlib, sys, torch, torch.distributed as dist\n"
        "torch.set_num_threads(1)\n"
        "from cmarr.pipelines import train as T\n"
        "store, cfg, out = sys.argv[1:4]\n"
        "seen = {}\n"
        "orig = T.FoldRecipe.fit\n"
        "def fit(self):\n"
        "    res = orig(self)\n"
        "    h = hashlib.sha256()\n"
        "    for k, v in sorted(self.model.state_dict().items()): h.update(v.detach().cpu().numpy().tobytes())\n"
        "    seen['hash'] = h.hexdigest(); seen['steps'] = self.rows[-1]['steps']\n"
        "    return res\n"
        "T.FoldRecipe.fit = fit\n"
        "m = T.run_training(store, cfg, out_dir=out, folds=[1], device='cpu', epochs=1, log=None)\n"
        # one write per rank, atomic on a pipe: print() with several arguments writes them one by
        # one when the output is unbuffered, and the two ranks' pieces could interleave
        "line = ' '.join(map(str, ['RANK', dist.get_rank(), dist.get_world_size(), dist.get_backend(),"
        " seen['hash'], seen['steps'], m['summary']['avg']['uar_mean']])) + '\\n'\n"
        "sys.stdout.write(line); sys.stdout.flush()\n")
    env_vars = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    out = tmp_path / "ddp-run"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), str(store), str(cfg), str(out)],  # --standalone: a free port
                          capture_output=True, text=True, timeout=240, env=env_vars)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # found anywhere in the output: the two ranks share one stdout, and another line may precede
    # a rank's line without its newline yet
    lines = sorted(["RANK", *m] for m in re.findall(r"RANK (\d) (\d) (\w+) ([0-9a-f]{64}) (\d+) (\S+)", proc.stdout))
    assert [ln[1] for ln in lines] == ["0", "1"] and all(ln[2] == "2" and ln[3] == "gloo" for ln in lines), \
        proc.stdout[-3000:] + proc.stderr[-3000:]
    assert lines[0][4] == lines[1][4]  # both ranks hold the same weights after training (best checkpoint)
    assert lines[0][6] == lines[1][6]  # and report the same metrics
    single = run_training(store, cfg, out_dir=tmp_path / "single", folds=[1], device="cpu", epochs=1, log=None)
    # each rank took half the batches of the epoch
    rows = (out / "fold1" / "log.csv").read_text().splitlines()
    n_ddp = int(rows[1].split(",")[7])
    n_single = int((tmp_path / "single" / "fold1" / "log.csv").read_text().splitlines()[1].split(",")[7])
    assert n_ddp == pytest.approx(n_single / 2, abs=1)
    # batch_size is per process: the checkpoint says how many, and a resume with another number is refused
    assert torch.load(out / "fold1" / "best.pt", weights_only=True)["processes"] == 2
    (out / "fold1" / "metrics.json").unlink()  # the fold not done: the rerun resumes from last.pt
    with pytest.raises(TrainError, match="trained with 2 process"):
        run_training(store, cfg, out_dir=out, folds=[1], device="cpu", epochs=1, log=None)
    assert (out / "metrics.json").is_file()
    assert single["folds"]["1"].keys() == json.loads((out / "metrics.json").read_text())["folds"]["1"].keys()


def test_fold_jobs_are_spread_over_the_visible_gpus(tmp_path, monkeypatch):
    """cm-arr-train --jobs on a machine with several GPUs: each fold process sees one GPU, the
    one with the fewest running folds, named in the terms of CUDA_VISIBLE_DEVICES."""
    from cmarr.pipelines import jobs as T

    assert T.job_env({"A": "1"}, None) == {"A": "1"}
    assert T.job_env({}, 1)["CUDA_VISIBLE_DEVICES"] == "1"
    assert T.job_env({"CUDA_VISIBLE_DEVICES": "4, 6"}, 1)["CUDA_VISIBLE_DEVICES"] == "6"
    started, cmds = [], []

    class Done:
        def __init__(self, cmd, env):
            started.append((cmd[cmd.index("--folds") + 1], env.get("CUDA_VISIBLE_DEVICES")))
            cmds.append(cmd)
            self.returncode = 0

        def poll(self):
            return 0

    monkeypatch.setattr(T.subprocess, "Popen", Done)
    monkeypatch.setattr(T.time, "sleep", lambda s: None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    T.run_jobs("f.h5", tmp_path, [1, 2, 3, 4, 5], jobs=3, log=lambda s: None, gpus=2)
    assert started == [("1", "0"), ("2", "1"), ("3", "0"), ("4", "0"), ("5", "1")]
    started.clear()
    T.run_jobs("f.h5", tmp_path, [1, 2], jobs=2, log=lambda s: None, gpus=0)  # one GPU or none: untouched
    assert started == [("1", None), ("2", None)]
    # this run's device, not config.yaml's
    T.run_jobs("f.h5", tmp_path, [1, 2], jobs=2, log=lambda s: None, device="cpu")
    assert all(c[c.index("--device") + 1] == "cpu" for c in cmds[-2:])


def test_a_fold_process_ends_with_the_jobs_process_that_started_it(tmp_path):
    """--jobs fold processes die with their parent, even one killed by SIGKILL, so that a
    rerun does not train the same folds beside orphans; one whose parent is already gone
    ends at once."""
    import signal

    from cmarr.pipelines.jobs import JOB_PARENT_ENV

    child = ("import os, sys, time; from cmarr.pipelines.jobs import die_with_job_parent; die_with_job_parent(); "
             "print(os.getpid(), flush=True); time.sleep(60)")
    gone = subprocess.run([sys.executable, "-c", child], env={**os.environ, JOB_PARENT_ENV: "1"},
                          capture_output=True, text=True, timeout=60)
    assert gone.returncode == -signal.SIGTERM and not gone.stdout  # its "parent" (pid 1) is not its parent
    parent = ("import os, subprocess, sys, time; "
              f"p = subprocess.Popen([sys.executable, '-c', {child!r}], "
              f"env={{**os.environ, {JOB_PARENT_ENV!r}: str(os.getpid())}}); "
              "time.sleep(60)")
    par = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    pid = int(par.stdout.readline())  # the fold process is up
    par.kill()
    par.wait()
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        raise AssertionError("the fold process outlived its --jobs parent")


def test_a_resume_on_another_split_is_refused(env, tmp_path):
    """A last.pt whose split differs from this run's (e.g. another validation rule) is
    refused: its epochs were selected on other utterances."""
    root, store, cfg = env
    out = tmp_path / "run"
    run_training(store, cfg, out_dir=out, folds=[1], epochs=1, log=None)
    (out / "fold1" / "metrics.json").unlink()
    last = out / "fold1" / "last.pt"
    ck = torch.load(last, weights_only=True)
    split = dict(ck["split"])
    split["val"], split["test"] = split["test"], split["val"]
    torch.save({**ck, "split": split}, last)
    with pytest.raises(TrainError, match="another train/validation/test split of fold 1"):
        run_training(store, cfg, out_dir=out, folds=[1], epochs=1, log=None)


def test_run_dirs_of_an_earlier_run_format_are_refused(env, tmp_path):
    """A RUN_DIR written by an earlier version (its model_config.yaml or a fold's
    metrics.json without this version's run format) is neither continued nor combined: a
    one-line message names the file."""
    import yaml

    root, store, cfg = env
    out = tmp_path / "run"
    run_training(store, cfg, out_dir=out, folds=[1], epochs=1, log=None)
    side = out / "model_config.yaml"
    doc = yaml.safe_load(side.read_text())
    side.write_text(yaml.safe_dump({k: v for k, v in doc.items() if k != "format"}, sort_keys=False))
    with pytest.raises(TrainError, match=r"model_config\.yaml: is the record of a run of format 1, this version "
                                         r"reads format 2"):
        run_training(store, cfg, out_dir=out, folds=[2], epochs=1, log=None)
    res = runner.invoke(combine_app, [str(out), "--out", str(tmp_path / "c")])
    assert res.exit_code == 2 and "model_config.yaml: is the record of a run of format 1" in res.output, res.output
    side.write_text(yaml.safe_dump(doc, sort_keys=False))
    result = out / "fold1" / "metrics.json"
    r = json.loads(result.read_text())
    result.write_text(json.dumps({k: v for k, v in r.items() if k != "format"}))
    res = runner.invoke(combine_app, [str(out), "--out", str(tmp_path / "c")])
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "fold1/metrics.json: is a fold's result of run format 1" in text, res.output


def test_a_fold_being_trained_by_another_process_is_refused(env, tmp_path):
    from cmarr.pipelines.run_dir import lock_fold

    root, store, cfg = env
    held = lock_fold(tmp_path / "run", 1)
    try:
        with pytest.raises(TrainError, match=rf"fold 1 is being trained by pid {os.getpid()}"):
            run_training(store, cfg, out_dir=tmp_path / "run", folds=[1], epochs=1, log=None)
    finally:
        held.release()
    run_training(store, cfg, out_dir=tmp_path / "run", folds=[1], epochs=1, log=None)  # released: it runs


def test_run_summary_covers_every_finished_fold_and_one_protocol(env, tmp_path):
    """Folds added to a RUN_DIR by later --folds runs are all in its metrics.json (not only
    the last run's); folds trained with different numbers of processes are not averaged."""
    root, store, cfg = env
    out = tmp_path / "run"
    run_training(store, cfg, out_dir=out, folds=[1], epochs=1, log=None)
    m = run_training(store, cfg, out_dir=out, folds=[2], epochs=1, log=None)
    assert sorted(m["folds"]) == ["1", "2"]
    assert sorted(json.loads((out / "metrics.json").read_text())["folds"]) == ["1", "2"]
    assert m["config"]["protocol"]["folds"] == [1, 2]
    r = json.loads((out / "fold2" / "metrics.json").read_text())
    assert r["processes"] == 1
    (out / "fold2" / "metrics.json").write_text(json.dumps({**r, "processes": 2}))
    with pytest.raises(TrainError, match="different numbers of processes.*fold 1: 1, fold 2: 2"):
        run_training(store, cfg, out_dir=out, folds=[1], epochs=1, log=None)
    res = runner.invoke(combine_app, [str(out), "--out", str(tmp_path / "c")])
    assert res.exit_code == 2 and "different numbers of processes" in res.output, res.output


def test_damaged_run_files_and_a_full_disk_are_messages(env, tmp_path, monkeypatch):
    root, store, cfg = env
    out = tmp_path / "run"
    base = ["--features", store, "--config", cfg, "--epochs", "1", "--out", out, "--folds", "1"]
    assert _train(base).exit_code == 0
    (out / "fold1" / "metrics.json").write_text("{")
    res = _train(base)
    assert res.exit_code == 2 and "fold1/metrics.json: not a fold's metrics.json" in res.output, res.output
    (out / "fold1" / "metrics.json").unlink()
    (out / "fold1" / "best.pt").write_bytes(b"PK\x03")  # last.pt at the final epoch: only testing is left
    res = _train(base)
    assert res.exit_code == 2 and "best.pt: cannot be read" in res.output and "remove" in res.output, res.output
    (out / "config.yaml").write_text("optim: [unclosed\n")
    res = _train(["--features", store, "--config", cfg, "--epochs", "1", "--out", out, "--folds", "2"])
    assert res.exit_code == 2 and "config.yaml: cannot be read" in res.output, res.output
    _no_traceback(res)
    # the disk fills while a checkpoint is written: a message, no partial file left, resumable
    import cmarr.pipelines.checkpoint as T

    real = T.torch.save

    def full(obj, path, *a, **k):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(T.torch, "save", full)
    res = _train(["--features", store, "--config", cfg, "--epochs", "1", "--out", tmp_path / "full"])
    assert res.exit_code == 2 and "cannot be written (OSError" in res.output and "resume" in res.output, res.output
    assert not list((tmp_path / "full").glob("fold*/*.tmp-*"))
    monkeypatch.setattr(T.torch, "save", real)


def test_a_data_problem_of_any_fold_is_found_before_training(env, tmp_path):
    root, store, cfg = env
    bad = make_synthetic_store(tmp_path / "novid3.h5", n_per_class=3, sessions=3, seed=2, absent_folds={"video": [3]})
    res = _train(["--features", bad, "--config", cfg, "--epochs", "1", "--out", tmp_path / "run"])
    assert res.exit_code == 2 and "fold 3: no test utterance has any input under condition v" in res.output
    assert not list((tmp_path / "run").glob("fold*/best.pt"))  # folds 1 and 2 did not train first


def test_combine_refuses_unfinished_folds_and_existing_results(env, tmp_path):
    root, store, cfg = env
    run = tmp_path / "run"
    run_training(store, cfg, out_dir=run, folds=[1], epochs=1, log=None)
    (run / "fold2").mkdir()  # a fold that was started and killed
    res = runner.invoke(combine_app, [str(run), "--out", str(tmp_path / "c")])
    assert res.exit_code == 2 and "fold2 not finished" in res.output and "--allow-unfinished" in res.output
    # a run of every fold (no --folds: its config lists none) whose fold 3 never started
    every = tmp_path / "every"
    run_training(store, cfg, out_dir=every, epochs=1, log=None)
    shutil.rmtree(every / "fold3")
    res = runner.invoke(combine_app, [str(every), "--out", str(tmp_path / "c-every")])
    assert res.exit_code == 2 and "fold3 not finished" in res.output, res.output
    res = runner.invoke(combine_app, [str(run), "--out", str(tmp_path / "c"), "--allow-unfinished"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(combine_app, [str(run), "--out", str(tmp_path / "c"), "--allow-unfinished"])
    assert res.exit_code == 2 and "already holds metrics.json" in res.output and "--overwrite" in res.output
    res = runner.invoke(combine_app, [str(run), "--out", str(tmp_path / "c"), "--allow-unfinished", "--overwrite"])
    assert res.exit_code == 0, res.output
