"""The paper's theory claim, measured: scaled GD needs about the same number of iterations whatever the condition
number of the target update, while GD's iteration count grows by a large factor."""

from hydra import compose, initialize_config_dir

from harness import load_records
from main_figures.theory import CONF_DIR, run_grid
from main_figures.theory_figures import select_best, theory_table

KAPPAS = (1, 10000)
CAP = 3000


def test_scaled_gd_is_flat_in_kappa_and_gd_is_not(tmp_path):
    overrides = [
        f"results_dir={tmp_path}", f"kappas=[{','.join(map(str, KAPPAS))}]", f"max_iters={CAP}",
        "studies=[{conditioning: target, optimizers: [sgd, scaled_gd]}]",
        "lr_grid.sgd=[0.25,0.5,1.0]", "lr_grid.scaled_gd=[0.25,0.5]", "sensitivity.perturbations=1",
    ]  # fmt: skip
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="theory", overrides=overrides)
    run_grid(cfg)
    records = load_records(tmp_path, "theory")
    assert len(records) == 2 * len(KAPPAS) * (3 + 2)  # the grid, and the grid from one perturbed start
    assert sum("perturbation" in r.tags for r in records) == len(KAPPAS) * (3 + 2)
    best = select_best(records)
    assert "1 perturbed" in theory_table(records)  # the table reports the perturbed start beside each cell
    scaled = [best[("target", "scaled_gd", float(k))] for k in KAPPAS]
    gd = [best[("target", "sgd", float(k))] for k in KAPPAS]

    # scaled GD reaches the tolerance at every kappa, in nearly the same number of iterations
    assert all(b.reached_tol for b in scaled), theory_table(records)
    its = [b.iterations for b in scaled]
    assert max(its) <= 1.5 * min(its), its

    # GD: as fast as scaled GD when kappa = 1, then a large slow-down: at kappa = 1e4 it has not reached the
    # tolerance after 4x the iterations it needed at kappa = 1 (and 4x what scaled GD needs), and is far from it
    assert gd[0].reached_tol and gd[0].iterations <= 1.5 * scaled[0].iterations
    assert gd[-1].iterations >= 4 * gd[0].iterations, [b.iterations for b in gd]
    assert gd[-1].iterations >= 4 * scaled[-1].iterations
    assert not gd[-1].reached_tol and gd[-1].relative_loss > 1e3 * cfg.tol
