import numpy as np

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
