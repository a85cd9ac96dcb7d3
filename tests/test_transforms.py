"""Transforms and rate–distortion tools of TQ, checked against their defining identities."""

import numpy as np
import pytest

from onnxtq import rd, transforms


def _layer(rng, n=24, c=12, kk=9, samples=4000):
    """A weight with correlated input channels and a correlated input autocorrelation H over (c, tap)."""
    mix = rng.standard_normal((c, c)) * np.linspace(2.0, 0.1, c)[None, :]
    w = np.einsum("nct,cd->ndt", rng.standard_normal((n, c, kk)), mix)
    x = rng.standard_normal((samples, c * kk)) @ (np.eye(c * kk) + 0.5 * rng.standard_normal((c * kk, c * kk)))
    return w, x.T @ x / samples


@pytest.mark.parametrize("kind", ["klt", "elt"])
def test_transform_is_exact_and_decorrelating(rng, kind):
    w, h = _layer(rng)
    gbar = transforms.tap_average(h, w.shape[1])
    t = transforms.klt(w) if kind == "klt" else transforms.elt(w, gbar)
    coeffs = transforms.coefficients(w, t.analysis)
    back = np.einsum("nkt,kc->nct", coeffs, t.synthesis)
    assert np.linalg.norm(back - w) / np.linalg.norm(w) < 1e-9
    cov = transforms.weight_covariance(coeffs)
    off = cov - np.diag(np.diag(cov))
    assert np.abs(off).max() < 1e-8 * np.abs(cov).max()  # coefficients decorrelated
    assert np.all(np.diff(t.energy) <= 1e-9 * t.energy[0])  # sorted by energy
    np.testing.assert_allclose(np.diag(cov), t.energy, rtol=1e-6)
    assert np.allclose(np.linalg.norm(t.synthesis, axis=1), 1.0)
    if kind == "elt":  # output-orthogonal channels: B Ḡ Bᵀ diagonal
        g = t.synthesis @ gbar @ t.synthesis.T
        assert np.abs(g - np.diag(np.diag(g))).max() < 1e-2 * np.abs(np.diag(g)).min()


def test_transformed_hessian_measures_the_same_error(rng):
    w, h = _layer(rng)
    t = transforms.elt(w, transforms.tap_average(h, w.shape[1]))
    h_t = transforms.transformed_hessian(h, t.synthesis)
    delta_t = rng.standard_normal((w.shape[0], w.shape[1], w.shape[2]))
    delta_w = np.einsum("nkt,kc->nct", delta_t, t.synthesis).reshape(w.shape[0], -1)
    flat_t = delta_t.reshape(w.shape[0], -1)
    np.testing.assert_allclose(((flat_t @ h_t) * flat_t).sum(), ((delta_w @ h) * delta_w).sum(), rtol=1e-10)


def test_fit_coefficients_absorbs_a_cut_basis(rng):
    w, h = _layer(rng)
    gbar = transforms.tap_average(h, w.shape[1])
    t = transforms.elt(w, gbar)
    basis = t.synthesis[:6]  # half the channels dropped
    fitted = transforms.fit_coefficients(w, basis, gbar)
    kept = transforms.coefficients(w, t.analysis)[:, :6]

    def err(coeffs):
        d = (np.einsum("nkt,kc->nct", coeffs, basis) - w).transpose(0, 2, 1).reshape(-1, w.shape[1])
        return ((d @ gbar) * d).sum()

    assert err(fitted) <= err(kept) * (1 + 1e-9)  # least squares in the output metric


def test_elt_gains_over_klt_and_identity_on_a_correlated_layer(rng):
    """The coding gain of Theorem 3 (high-rate, Gaussian): Π diag before / Π diag after, in the output metric."""
    w, h = _layer(rng)
    gbar = transforms.tap_average(h, w.shape[1])

    def gain(t):
        coeff_var = np.diag(transforms.weight_covariance(transforms.coefficients(w, t.analysis)))
        sens = np.diag(t.synthesis @ gbar @ t.synthesis.T)
        return np.exp(np.mean(np.log(coeff_var * sens)))

    ident = transforms.identity(w.shape[1], w)
    assert gain(transforms.elt(w, gbar)) < gain(transforms.klt(w)) < gain(ident)


def test_allocation_is_reverse_water_filling(rng):
    """Gaussian bands with the ideal D(R) = σ²·2^(−2R): the allocation gives equal distortion above the water level."""
    variances = np.array([16.0, 4.0, 1.0, 0.25, 0.01])
    depths = np.arange(0, 9)
    layers = {
        f"b{i}": [rd.Option("id", [rd.Band(depths, 100.0 * depths, 100 * v * 2.0 ** (-2 * depths))])]
        for i, v in enumerate(variances)
    }
    a = rd.allocate(layers, max_bits=100.0 * 8)
    assert a.bits == 800  # the greedy fill spends what the λ search left
    bits = [layers[k][0].bands[0].depth[a.choice[k][1][0]] for k in layers]
    assert bits == sorted(bits, reverse=True) and bits[-1] == 0 and bits[0] - bits[1] == 1
    tight = rd.allocate(layers, max_distortion=a.distortion)
    assert tight.distortion <= a.distortion
    with pytest.raises(ValueError):
        rd.allocate(layers)


def test_gaussian_bound_matches_the_closed_form():
    mu = np.array([[4.0, 1.0]])
    # D below both eigenvalues: θ = D/(rows·2), R = Σ ½log2(μ/θ) per row
    rows, d = 10, 0.5 * 10
    theta = d / (rows * 2)
    expect = rows * (0.5 * np.log2(4.0 / theta) + 0.5 * np.log2(1.0 / theta))
    assert rd.gaussian_bound_bits(mu, rows, d) == pytest.approx(expect, rel=1e-6)
    # between the eigenvalues: the small component gets no bits
    assert rd.gaussian_bound_bits(mu, rows, rows * (1.0 + 2.0)) == pytest.approx(rows * 0.5 * np.log2(2.0), rel=1e-6)
    assert rd.gaussian_bound_bits(mu, rows, rows * 5.0) == 0.0


def test_whitened_spectrum_is_the_spectrum_of_w_h_wt(rng):
    w = rng.standard_normal((1, 7, 5))
    a = rng.standard_normal((5, 5))
    h = (a @ a.T)[None]
    small = rd.whitened_spectrum(w, h)  # r > d branch
    expect = np.linalg.eigvalsh(w[0] @ h[0] @ w[0].T / 7)
    np.testing.assert_allclose(np.sort(small[0])[-5:], np.sort(expect)[-5:], rtol=1e-6, atol=1e-9)
