"""Folds trained together (``optim.stack_folds``): each fold gets the training it gets alone."""
import copy
import csv
import json

import pytest
import torch
from torch.func import functional_call, vmap
from typer.testing import CliRunner

from cmarr.extract.store import _read_table, _write_table
from cmarr.pipelines.config import ConfigError
from cmarr.pipelines.stacked import MemberAdam, StackedFolds, StackedParams, stack_groups
from cmarr.pipelines.synthetic import make_synthetic_store
from cmarr.pipelines.train import FoldRecipe, run_training
from cmarr.pipelines.train_cli import app
from tolerance import assert_float32_close

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_config):
    """A 3-session store whose folds differ in size (3 utterances of session 1 moved to fold 2,
    as session 2's), so that the folds' epochs have different numbers of steps and final
    batch sizes."""
    import h5py

    root = tmp_path_factory.mktemp("stacked")
    store = make_synthetic_store(root / "s.h5", n_per_class=4, sessions=3, seed=5)
    with h5py.File(store, "r+") as f:
        table = _read_table(f["utterances"])
        moved = table.index[table["fold"] == 1][:3]
        # into session 2 with its speakers: a session in two folds would be refused (a leak)
        table.loc[moved, "session"] = table.loc[table["fold"] == 2, "session"].iloc[0]
        table.loc[moved, "speaker"] = table.loc[moved, "speaker"].str.replace("Ses01", "Ses02")
        table.loc[moved, "fold"] = 2
        del f["utterances"]
        _write_table(f.create_group("utterances"), table)
    cfg = tiny_config(root / "tiny.yaml", batch_size=4, epochs=3)
    no_dropout = tiny_config(root / "tiny-nodrop.yaml", batch_size=4, epochs=3, dropout=0.0)
    return root, store, cfg, no_dropout


def _log(path):
    with open(path) as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- the optimizer

@pytest.mark.filterwarnings("ignore:grad and param do not obey")  # gradients in one buffer, on purpose
@pytest.mark.parametrize("kind,wd,clip", [("adam", 0.0, 0.0), ("adam", 0.1, 0.0), ("adamw", 0.1, 0.0),
                                          ("adam", 0.0, 0.05)])
def test_member_adam_is_torch_adam_for_each_member(kind, wd, clip):
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
              for _ in range(3)]
    alone = copy.deepcopy(models)
    stacked = StackedParams(models)
    skeleton = copy.deepcopy(models[0]).to("meta")
    opt = MemberAdam(stacked, lr=1e-2, betas=(0.8, 0.99), weight_decay=wd, decoupled=kind == "adamw", grad_clip=clip)
    cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    opts = [cls(m.parameters(), lr=1e-2, betas=(0.8, 0.99), weight_decay=wd) for m in alone]
    # members sit steps out, as a fold whose epoch has fewer batches does
    schedule = [(1, 1, 1), (1, 0, 1), (0, 0, 1), (1, 1, 0), (1, 1, 1), (0, 1, 1)]
    for active in schedule:
        x = torch.randn(3, 7, 5, dtype=torch.float64)
        stacked.zero_grad()
        losses = vmap(lambda p, xx: functional_call(skeleton, p, (xx,)).pow(2).mean())(stacked.params, x)
        losses[torch.tensor(active, dtype=torch.bool)].sum().backward()
        opt.step(torch.tensor(active, dtype=torch.bool))
        for e, m in enumerate(alone):
            if active[e]:
                opts[e].zero_grad()
                m(x[e]).pow(2).mean().backward()
                if clip:
                    torch.nn.utils.clip_grad_norm_(m.parameters(), clip)
                opts[e].step()
    assert opt.steps.tolist() == [4, 4, 5]
    # vmap'ed members against one model at a time: float64 sums in another order. Summed
    # terms per value: 6 steps of forward (5 and 4 products, 2 biases), the loss's mean over
    # 7 x 3 values and the gradient's sum over 7 samples (tests/tolerance.py).
    depth = 6 * (5 + 4 + 2 + 7 * 3 + 7)
    for e, m in enumerate(alone):
        for n, p in m.named_parameters():
            assert_float32_close(stacked.params[n][e], p, depth, f"member {e} {n}")
    # a member's state goes out in torch.optim.Adam's layout, and back in
    e = 1
    out = cls(copy.deepcopy(alone[e]).parameters(), lr=1e-2, betas=(0.8, 0.99), weight_decay=wd)
    opt.export_member(e, out)
    ref = opts[e].state_dict()["state"]
    got = out.state_dict()["state"]
    assert set(ref) == set(got)
    for i in ref:
        assert float(got[i]["step"]) == float(ref[i]["step"]) == 4
        assert_float32_close(got[i]["exp_avg"], ref[i]["exp_avg"], depth, f"exp_avg {i}")
        assert_float32_close(got[i]["exp_avg_sq"], ref[i]["exp_avg_sq"], depth, f"exp_avg_sq {i}")
    fresh = MemberAdam(StackedParams(models), lr=1e-2)
    fresh.import_member(2, opts[2])
    assert fresh.steps.tolist() == [0, 0, 5]
    assert_float32_close(fresh.exp_avg_sq[2], opt.exp_avg_sq[2], depth, "imported exp_avg_sq")
    assert not fresh.exp_avg[:2].any()


def test_stacked_parameters_are_views_and_gradients_land_in_one_buffer():
    models = [torch.nn.Linear(3, 2) for _ in range(2)]
    sp = StackedParams(models)
    assert sp.flat.numel() == 2 * (6 + 2) and sp.params["weight"].is_leaf
    torch.testing.assert_close(sp.params["weight"][1], models[1].weight, rtol=0, atol=0)  # a copy: exact
    sp.params["bias"].sum().backward()
    assert sp.flat_grad.sum().item() == 4  # the two biases' gradients, nothing else
    with torch.no_grad():
        sp.flat.zero_()
    assert not sp.params["weight"].any()


def test_stack_groups():
    assert stack_groups([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]
    assert stack_groups([3, 5], 1) == [[3], [5]]


# ---------------------------------------------------------------- whole runs

def test_stacked_run_is_the_one_fold_at_a_time_run_without_dropout(env):
    """With dropout 0 the only difference is float rounding: the same losses per epoch, the
    same number of steps per fold (which differ between folds here), the same files."""
    root, store, _, cfg = env
    alone = run_training(store, cfg, out_dir=root / "alone", device="cpu", log=None,
                         overrides={"data.pipeline": "resident"})
    logs = []
    together = run_training(store, cfg, out_dir=root / "together", device="cpu", log=logs.append,
                            overrides={"optim.stack_folds": 3})
    assert any("folds 1, 2, 3: trained together" in s for s in logs)
    steps = set()
    for k in (1, 2, 3):
        a, b = _log(root / "alone" / f"fold{k}" / "log.csv"), _log(root / "together" / f"fold{k}" / "log.csv")
        assert [r["epoch"] for r in b] == ["1", "2", "3"]
        for ra, rb in zip(a, b):
            assert ra["steps"] == rb["steps"]
            steps.add(ra["steps"])
            for col in ra:
                if col.startswith("loss_"):
                    assert float(rb[col]) == pytest.approx(float(ra[col]), rel=1e-3, abs=1e-4), (k, col)
        ca = torch.load(root / "alone" / f"fold{k}" / "last.pt", weights_only=True)
        cb = torch.load(root / "together" / f"fold{k}" / "last.pt", weights_only=True)
        assert ca.keys() == cb.keys() and ca["model"].keys() == cb["model"].keys()
        assert ca["split"] == cb["split"]
        sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
        assert {float(v["step"]) for v in sa.values()} == {float(v["step"]) for v in sb.values()}
        for i in sa:  # rounding differences grown over 3 epochs of training: near-zero entries
            # drift with the tensor's scale, not their own (seen: 9e-5 of the scale)
            torch.testing.assert_close(sb[i]["exp_avg"], sa[i]["exp_avg"], rtol=1e-2,
                                       atol=1e-3 * sa[i]["exp_avg"].abs().max().item())
        for n in ca["model"]:  # Adam moves a weight with a tiny gradient by about lr whatever its size
            torch.testing.assert_close(cb["model"][n], ca["model"][n], rtol=0, atol=3 * 3 * 1e-3)
    assert len(steps) > 1  # the folds' epochs have different numbers of steps
    assert together["folds"].keys() == alone["folds"].keys()
    assert (root / "together" / "results.md").is_file()


def test_interrupted_stacked_run_resumes_to_the_same_result(env, monkeypatch):
    root, store, cfg, _ = env
    over = {"optim.stack_folds": 3}
    full = run_training(store, cfg, out_dir=root / "st-full", device="cpu", log=None, overrides=over)

    rounds = []
    real_round = StackedFolds._round

    def dies_in_round_2(self, members):
        rounds.append(members)
        if len(rounds) == 2:
            raise KeyboardInterrupt
        return real_round(self, members)

    monkeypatch.setattr(StackedFolds, "_round", dies_in_round_2)
    out = root / "st-killed"
    with pytest.raises(KeyboardInterrupt):
        run_training(store, cfg, out_dir=out, device="cpu", log=None, overrides=over)
    monkeypatch.undo()
    logs = []
    resumed = run_training(store, cfg, out_dir=out, device="cpu", log=logs.append, overrides=over)
    assert sum("resumed after epoch 1" in s for s in logs) == 3
    assert resumed["folds"] == full["folds"]
    strip = lambda p: [",".join(r.split(",")[:-1]) for r in p.read_text().splitlines()]  # no seconds
    for k in (1, 2, 3):
        assert strip(out / f"fold{k}" / "log.csv") == strip(root / "st-full" / f"fold{k}" / "log.csv")


def test_folds_at_different_epochs_resume_together_or_alone(env, monkeypatch):
    """Killed between two folds' checkpoints of one round: fold 1 has finished epoch 2, the
    others epoch 1. A stacked rerun trains each fold from its own epoch; a fold's files are
    the same as a one-fold run's, so it also resumes alone."""
    root, store, cfg, _ = env
    over = {"optim.stack_folds": 3}
    real_end = FoldRecipe.end_epoch

    def dies_after_fold1_epoch2(self, epoch, *a, **kw):
        if self.fold == 2 and epoch == 2:
            raise KeyboardInterrupt
        return real_end(self, epoch, *a, **kw)

    monkeypatch.setattr(FoldRecipe, "end_epoch", dies_after_fold1_epoch2)
    out = root / "st-uneven"
    with pytest.raises(KeyboardInterrupt):
        run_training(store, cfg, out_dir=out, device="cpu", log=None, overrides=over)
    monkeypatch.undo()
    assert len(_log(out / "fold1" / "log.csv")) == 2 and len(_log(out / "fold2" / "log.csv")) == 1
    logs = []
    run_training(store, cfg, out_dir=out, folds=[3], device="cpu", log=logs.append)  # fold 3 alone, unstacked
    assert any("fold 3: resumed after epoch 1" in s for s in logs)
    logs.clear()
    run_training(store, cfg, out_dir=out, device="cpu", log=logs.append, overrides=over)
    assert any("fold 1: resumed after epoch 2" in s for s in logs)
    assert any("fold 2: resumed after epoch 1" in s for s in logs)
    assert any("fold 3: already done" in s for s in logs)
    for k in (1, 2, 3):
        assert [r["epoch"] for r in _log(out / f"fold{k}" / "log.csv")] == ["1", "2", "3"]
        m = json.loads((out / f"fold{k}" / "metrics.json").read_text())
        assert 1 <= m["best_epoch"] <= 3
    assert json.loads((out / "metrics.json").read_text())["folds"].keys() == {"1", "2", "3"}


def test_stack_folds_on_the_command_line_and_bad_settings(env):
    root, store, cfg, _ = env
    runner = CliRunner()
    res = runner.invoke(app, ["--features", str(store), "--config", str(cfg), "--folds", "1,2", "--epochs", "1",
                              "--stack-folds", "2", "--out", str(root / "cli"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "folds 1, 2: trained together" in res.output
    assert "stack_folds: 2" in (root / "cli" / "config.yaml").read_text()
    # with --jobs, each process trains a stacked group
    res = runner.invoke(app, ["--features", str(store), "--config", str(cfg), "--epochs", "1", "--jobs", "2",
                              "--stack-folds", "2", "--out", str(root / "cli-jobs"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "folds 1,2: started as a separate process" in res.output and "fold 3: started" in res.output
    assert json.loads((root / "cli-jobs" / "metrics.json").read_text())["folds"].keys() == {"1", "2", "3"}
    for args, message in [(["--stack-folds", "0"], "optim.stack_folds must be >= 1"),
                          (["--stack-folds", "2", "--set", "data.pipeline=eager"], "needs data.pipeline resident")]:
        res = runner.invoke(app, ["--features", str(store), "--config", str(cfg), "--epochs", "1",
                                  "--out", str(root / "cli-bad"), "--device", "cpu", *args])
        assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, res.output
    with pytest.raises(ConfigError):
        run_training(store, cfg, out_dir=root / "cli-bad2", device="cpu", log=None, overrides={"optim.stack_folds": -1})


def test_compiled_stacked_step_trains_like_the_eager_one(env):
    """optim.compile with stacked folds: the full-batch step of all folds is one compiled graph
    (aot_eager here: the graph torch.compile traces and differentiates, without generating
    kernels); without dropout it trains as the eager stacked step does."""
    root, store, _, cfg = env
    over = {"optim.stack_folds": 3}
    eager = run_training(store, cfg, out_dir=root / "st-eager", device="cpu", epochs=2, log=None, overrides=over)
    used = []
    real_fit = StackedFolds.fit

    def fit(self):
        out = real_fit(self)
        used.append(self.compiled_steps)
        return out

    import unittest.mock
    with unittest.mock.patch.object(StackedFolds, "fit", fit):
        compiled = run_training(store, cfg, out_dir=root / "st-compiled", device="cpu", epochs=2, log=None,
                                overrides={**over, "optim.compile": "on", "optim.compile_backend": "aot_eager"})
    assert used and used[0] > 0  # the compiled step ran (the full-batch steps of both epochs)
    for k in (1, 2, 3):
        a, b = _log(root / "st-eager" / f"fold{k}" / "log.csv"), _log(root / "st-compiled" / f"fold{k}" / "log.csv")
        for ra, rb in zip(a, b):
            assert ra["steps"] == rb["steps"]
            for col in ra:
                if col.startswith("loss_"):
                    assert float(rb[col]) == pytest.approx(float(ra[col]), rel=1e-3, abs=1e-4), (k, col)
    assert compiled["folds"].keys() == eager["folds"].keys()


@pytest.mark.parametrize("variant", ["baseline", "point", "no-attention"])
def test_stacked_variants_with_bf16_adamw_and_clipping(env, variant):
    """Every model path under vmap with autocast; 3 folds by 2: a stacked pair, then one alone."""
    root, store, cfg, _ = env
    logs = []
    m = run_training(store, cfg, variant=variant, out_dir=root / f"var-{variant}", device="cpu", epochs=1,
                     log=logs.append, overrides={"optim.stack_folds": 2, "optim.amp": "bf16", "optim.grad_clip": 0.5,
                                                 "optim.optimizer": "adamw", "optim.weight_decay": 0.01})
    assert any("folds 1, 2: trained together" in s for s in logs)
    assert not any("folds 3" in s for s in logs)
    assert set(m["folds"]) == {"1", "2", "3"}
    for k in (1, 2, 3):
        ck = torch.load(root / f"var-{variant}" / f"fold{k}" / "last.pt", weights_only=True)
        assert ck["variant"] == variant and all(torch.isfinite(v).all() for v in ck["model"].values())


def test_a_fold_trained_alone_resumes_in_a_stacked_run(env, monkeypatch):
    """A one-fold run's last.pt (torch.optim.Adam state) is picked up by a stacked run."""
    root, store, cfg, _ = env
    real_train = FoldRecipe.train_epoch

    def dies_in_epoch_2(self, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return real_train(self, epoch)

    monkeypatch.setattr(FoldRecipe, "train_epoch", dies_in_epoch_2)
    out = root / "alone-then-stacked"
    with pytest.raises(KeyboardInterrupt):
        run_training(store, cfg, out_dir=out, folds=[1], device="cpu", log=None)
    monkeypatch.undo()
    alone = torch.load(out / "fold1" / "last.pt", weights_only=True)
    logs = []
    run_training(store, cfg, out_dir=out, device="cpu", log=logs.append, overrides={"optim.stack_folds": 3})
    assert any("fold 1: resumed after epoch 1" in s for s in logs)
    assert any("folds 1, 2, 3: trained together" in s for s in logs)
    rows = _log(out / "fold1" / "log.csv")
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    after = torch.load(out / "fold1" / "last.pt", weights_only=True)
    steps = [int(r["steps"]) for r in rows]
    # Adam's step count went on from the one-fold run's
    assert {float(v["step"]) for v in alone["optimizer"]["state"].values()} == {float(steps[0])}
    assert {float(v["step"]) for v in after["optimizer"]["state"].values()} == {float(sum(steps))}
