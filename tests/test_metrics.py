import numpy as np
import pytest

from dlg_jax.results.metrics import image_metrics, match_to_truth


def test_matching_recovers_a_known_permutation():
    rng = np.random.default_rng(0)
    truth = rng.uniform(size=(6, 8, 8, 3))
    permutation = np.array([3, 0, 5, 1, 4, 2])
    noisy = truth[permutation] + rng.normal(scale=0.02, size=truth.shape)
    order = match_to_truth(truth, noisy)
    assert np.array_equal(permutation[order], np.arange(6))
    assert np.all(image_metrics(truth, noisy[order])["psnr"] > 30)


def test_matching_is_a_global_assignment_not_greedy():
    # Greedy by row would give truth 0 the reconstruction 0 (cost 1) and leave truth 1 with cost 100;
    # the assignment pays 2 + 2 instead.
    truth = np.zeros((2, 1, 1, 1))
    truth[1] = 1.0
    recon = np.array([0.1, 0.0]).reshape(2, 1, 1, 1)
    assert match_to_truth(truth, recon).tolist() in ([1, 0], [0, 1])
    recon = np.array([0.45, 0.0]).reshape(2, 1, 1, 1)  # 0.45 is closer to truth 1 than 0.0 is
    assert match_to_truth(truth, recon).tolist() == [1, 0]


def test_psnr_and_ssim_of_identical_and_clipped_images():
    rng = np.random.default_rng(1)
    truth = rng.uniform(size=(2, 16, 16, 3))
    same = image_metrics(truth, truth)
    assert np.all(same["mse"] == 0) and np.all(same["ssim"] > 0.999)
    out_of_range = truth + 5.0  # clipped to 1 before judging
    assert np.allclose(image_metrics(truth, out_of_range)["mse"], ((truth - 1.0) ** 2).mean(axis=(1, 2, 3)), atol=1e-6)


def test_matching_beats_greedy_on_three():
    """Greedy (each truth in turn takes its nearest free reconstruction) matches 0->1, 1->0, 2->2 and pays
    0.04 + 0.09 + 0.81 = 0.94; the assignment pays 0.09 + 0.25 + 0.0 = 0.34 (0->2, 1->1, 2->0)."""
    truth = np.array([0.6, 0.3, 0.0]).reshape(3, 1, 1, 1)
    recon = np.array([0.0, 0.8, 0.9]).reshape(3, 1, 1, 1)
    assert match_to_truth(truth, recon).tolist() == [2, 1, 0]


def test_summarise_counts_successes_from_30_db_on_hand_made_rows():
    from dlg_jax.results.report import summarise

    def row(index, psnr, status, **extra):
        return {**dict(index=index, seed=0, psnr=psnr, status=status, seconds=2.0, evaluations=10, label_pred=1,
                       label_true=1), **extra}

    rows = [row(0, 30.0, "converged"), row(1, 29.99, "max_steps"), row(2, None, "diverged", label_pred=2),
            dict(row(3, 30.5, "converged"), label_accuracy=0.5,
                 images=[dict(index=3, psnr=31.0), dict(index=4, psnr=30.0)])]
    s = summarise(rows)
    assert s["rows"] == 4 and s["images"] == 5  # the batch row counts its two images
    assert s["successes"] == 3 and s["success_rate"] == pytest.approx(3 / 5)  # 30.0 exactly is a success
    assert s["median_psnr"] == pytest.approx(30.0) and s["statuses"] == {"converged": 2, "diverged": 1, "max_steps": 1}
    assert s["label_accuracy"] == pytest.approx((1 + 1 + 0 + 0.5) / 4)
    assert s["attack_seconds"] == 8.0 and s["attacks_per_hour"] == pytest.approx(4 / 8 * 3600)
    assert summarise(rows, attack_seconds=4.0)["attacks_per_hour"] == pytest.approx(3600)


def test_saving_figures_leaves_the_process_matplotlib_backend_alone(tmp_path):
    """A notebook's inline backend must survive an attack or a sweep saving its figures (no matplotlib.use)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import matplotlib
        matplotlib.use("pdf")
        import numpy as np
        from pathlib import Path
        from dlg_jax.results import plots, report
        out = Path({str(tmp_path)!r})
        images = np.random.default_rng(0).random((2, 8, 8, 3))
        plots.save_history(out / "h.png", [(0, images), (10, images)], stop="converged")
        plots.save_reconstruction(out / "r.png", images, images, [("a", "b"), ("c", "d")])
        plots.save_trace(out / "t.png", [(0, 1.0, 1), (1, 0.5, 3)], [(0, 5.0), (1, 6.0)], stop="converged")
        report.save_histogram(out / "p.png", [dict(index=0, seed=0, psnr=31.0), dict(index=1, seed=0, psnr=12.0)])
        print(matplotlib.get_backend())
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "pdf"
    assert all((tmp_path / f"{name}.png").stat().st_size > 1000 for name in "hrtp")
