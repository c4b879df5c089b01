"""Independent plain-NumPy reference for the server transforms of optax_localsgd.

Written from docs/features.md (feature sets ``ada-v1`` and ``ada-v2``; the latter from the
authors' published formulas, with their tensor layout: factored statistics with the reduced axis
deleted, not kept) and section 2 of the technical contract, without looking at the JAX
implementation. Everything is computed in float64;
the JAX code computes in float32, so comparisons need a float32-sized tolerance.

Leaves are plain lists of ``np.ndarray`` in a fixed order chosen by the caller.
"""

import math

import numpy as np

BETA0 = (0.9, 0.99, 0.999, 0.999, 0.9, 0.99, 0.999)
TIME_SCALES = (1, 3, 10, 30, 100, 300, 1e3, 3e3, 1e4, 3e4, 1e5)

# Smallest normal float32; used as a floor on the row-accumulator mean.
FLT_MIN = 1.1754944e-38


# ---------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------

def local_sgd_update(deltas, learning_rate):
    """update = -lr * delta, per leaf."""
    return [-float(learning_rate) * np.asarray(d, dtype=np.float64) for d in deltas]


class SlowMo:
    """SlowMo server step (Wang et al. 2019): u <- beta*u + delta/gamma; update = -alpha*gamma*u.

    ``slow_learning_rate`` and ``local_learning_rate`` may be functions of the round t (0 at the
    first step), evaluated here in float64."""

    def __init__(self, slow_learning_rate, momentum, local_learning_rate, shapes):
        self.alpha = _as_schedule(slow_learning_rate)
        self.beta = float(momentum)
        self.gamma = _as_schedule(local_learning_rate)
        self.u = [np.zeros(tuple(s), dtype=np.float64) for s in shapes]
        self.t = 0

    def step(self, deltas):
        """u <- beta*u + delta/gamma ; update = -alpha*gamma*u   (SPEC section 2). Returns updates."""
        alpha, gamma = self.alpha(self.t), self.gamma(self.t)
        updates = []
        for i, d in enumerate(deltas):
            d = np.asarray(d, dtype=np.float64)
            self.u[i] = self.beta * self.u[i] + d / gamma
            updates.append(-alpha * gamma * self.u[i])
        self.t += 1
        return updates


def _as_schedule(x):
    return (lambda t: float(x(t))) if callable(x) else (lambda t: float(x))


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

def factor_axes(shape):
    """Return (view_shape, row_axis, col_axis) per the 'factored view' table in docs/features.md."""
    shape = tuple(int(n) for n in shape)
    if len(shape) == 0:
        return (1, 1), 0, 1
    if len(shape) == 1:
        return (shape[0], 1), 0, 1
    # Sort axes by (size, axis index), descending; ties go to the later axis.
    keyed = [(shape[a], a) for a in range(len(shape))]
    keyed.sort(reverse=True)
    a, b = keyed[0][1], keyed[1][1]
    return shape, min(a, b), max(a, b)


def rsqrt(x, eps=1e-10):
    """1 / sqrt(max(x, eps))."""
    return 1.0 / np.sqrt(np.maximum(x, eps))


def normalize(x):
    """x / sqrt(mean(x^2)) over the whole tensor, computed via max|x| to avoid overflow; 0 if x == 0."""
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return x.copy()
    s = np.max(np.abs(x))
    if s == 0:
        return np.zeros_like(x)
    y = x / s
    ms = np.mean(y * y)
    if ms == 0:
        return np.zeros_like(x)
    return y / math.sqrt(ms)


def sigmoid(x):
    """Logistic function."""
    return 1.0 / (1.0 + math.exp(-x))


def logit(p):
    """Inverse of the logistic function."""
    return math.log(p / (1.0 - p))


def mlp_param_count(n_in, hidden=32):
    """Weights and biases of the n_in -> hidden -> hidden -> 2 MLP."""
    return (n_in + 1) * hidden + (hidden + 1) * hidden + (hidden + 1) * 2


def mlp_apply(mlp, x):
    """inputs -> 32 -> 32 -> 2 with ReLU after the two hidden layers; returns (N, 2)."""
    w0 = np.asarray(mlp["w0"], dtype=np.float64)
    b0 = np.asarray(mlp["b0"], dtype=np.float64)
    w1 = np.asarray(mlp["w1"], dtype=np.float64)
    b1 = np.asarray(mlp["b1"], dtype=np.float64)
    w2 = np.asarray(mlp["w2"], dtype=np.float64)
    b2 = np.asarray(mlp["b2"], dtype=np.float64)
    h1 = np.maximum(x @ w0 + b0, 0.0)
    h2 = np.maximum(h1 @ w1 + b1, 0.0)
    return h2 @ w2 + b2


# ---------------------------------------------------------------------------
# Learned optimizers (LOpt-A, LAgg-A)
# ---------------------------------------------------------------------------

class Learned:
    """LOpt-A when k is None, LAgg-A when k is an int; feature_set 'ada-v1' or 'ada-v2'."""

    def __init__(self, mlp, decay_offsets, shapes, k=None,
                 step_mult=1e-3, exp_mult=1e-3, eps=1e-10, feature_set="ada-v1"):
        self.mlp = mlp
        self.k = k
        self.feature_set = feature_set
        self.step_mult = float(step_mult)
        self.exp_mult = float(exp_mult)
        self.eps = float(eps)
        offsets = np.asarray(decay_offsets, dtype=np.float64).reshape(-1)
        assert offsets.shape == (7,), offsets.shape
        # betas[0..6] are the doc's beta_1..beta_7.
        if feature_set == "ada-v1":
            self.betas = [sigmoid(logit(BETA0[j]) + float(offsets[j])) for j in range(7)]
        else:  # beta = 1 - exp(10 p), p = log(1 - beta0)/10 + offset; clip(0, 1) from beta_4 on
            self.betas = [1.0 - math.exp(10.0 * (math.log(1.0 - BETA0[j]) / 10.0 + offsets[j]))
                          for j in range(7)]
            self.betas = self.betas[:3] + [min(max(b, 0.0), 1.0) for b in self.betas[3:]]
        self.shapes = [tuple(int(n) for n in s) for s in shapes]
        self.t = 0
        # Per leaf state, all in the view shape.
        self.state = []
        for shape in self.shapes:
            view, ra, ca = factor_axes(shape)
            row_shape = list(view)
            row_shape[ca] = 1
            col_shape = list(view)
            col_shape[ra] = 1
            self.state.append({
                "m": [np.zeros(view) for _ in range(3)],
                "v": np.zeros(view),
                "r": [np.zeros(tuple(row_shape)) for _ in range(3)],
                "c": [np.zeros(tuple(col_shape)) for _ in range(3)],
            })

    @property
    def n_in(self):
        """Number of input features: 39 (LOpt-A) or 38 + K (LAgg-A)."""
        return 39 if self.k is None else 38 + self.k

    def _leaf_features(self, idx, w, delta):
        """Update leaf idx's accumulators and return its (N, n_in) feature matrix."""
        if self.feature_set == "ada-v2":
            return self._leaf_features_v2(idx, w, delta)
        shape = self.shapes[idx]
        view, ra, ca = factor_axes(shape)
        b = self.betas
        eps = self.eps
        st = self.state[idx]

        w = np.asarray(w, dtype=np.float64)
        assert w.shape == shape, (w.shape, shape)
        if self.k is None:
            delta = np.asarray(delta, dtype=np.float64)
            assert delta.shape == shape, (delta.shape, shape)
            worker_deltas = None
            d = delta
        else:
            worker_deltas = np.asarray(delta, dtype=np.float64)
            assert worker_deltas.shape == (self.k,) + shape, (worker_deltas.shape, shape)
            d = np.mean(worker_deltas, axis=0)

        d = d.reshape(view)
        d2 = d * d

        # Accumulators.
        for i in range(3):
            st["m"][i] = b[i] * st["m"][i] + (1.0 - b[i]) * d
        st["v"] = b[3] * st["v"] + (1.0 - b[3]) * d2
        for i in range(3):
            bi = b[4 + i]
            st["r"][i] = bi * st["r"][i] + (1.0 - bi) * np.mean(d2, axis=ca, keepdims=True)
            st["c"][i] = bi * st["c"][i] + (1.0 - bi) * np.mean(d2, axis=ra, keepdims=True)

        m, v, r, c = st["m"], st["v"], st["r"], st["c"]

        # Factored estimates of 1/sqrt(E[delta^2]).
        fac = []
        for i in range(3):
            row_mean = np.maximum(np.mean(r[i], axis=ra, keepdims=True), FLT_MIN)
            row_factor = rsqrt(r[i] / row_mean, eps)
            col_factor = rsqrt(c[i], eps)
            fac.append(np.broadcast_to(row_factor * col_factor, view))

        def tile(x):
            return np.broadcast_to(x, view)

        rs_v = rsqrt(v, eps)
        feats = []                                              # each in the view shape
        feats.append(w.reshape(view))                           # 0
        feats.extend(m[i] for i in range(3))                    # 1-3
        feats.append(v)                                         # 4
        feats.extend(m[i] * rs_v for i in range(3))             # 5-7
        feats.append(rs_v)                                      # 8
        feats.extend(d * fac[i] for i in range(3))              # 9-11
        feats.extend(tile(r[i]) for i in range(3))              # 12-14
        feats.extend(tile(c[i]) for i in range(3))              # 15-17
        feats.extend(tile(rsqrt(r[i], eps)) for i in range(3))  # 18-20
        feats.extend(tile(rsqrt(c[i], eps)) for i in range(3))  # 21-23
        feats.extend(m[i] * fac[i] for i in range(3))           # 24-26
        if worker_deltas is None:
            feats.append(d)                                     # 27
        else:
            for kk in range(self.k):                            # 27 .. 27+K-1
                feats.append(worker_deltas[kk].reshape(view))

        n = int(np.prod(shape)) if len(shape) else 1
        columns = [normalize(f).reshape(n) for f in feats]
        for x in TIME_SCALES:
            columns.append(np.full(n, math.tanh(self.t / float(x))))
        out = np.stack(columns, axis=1)
        assert out.shape == (n, self.n_in), out.shape
        return out

    def _leaf_features_v2(self, idx, w, delta):
        """ada-v2, in the authors' layout: w, Δ and m in the tensor's own shape; factored
        statistics of rank >= 2 with the reduced axis deleted; a full second moment otherwise."""
        shape = self.shapes[idx]
        b = self.betas
        st = self.state[idx].setdefault("v2", {})
        w = np.asarray(w, dtype=np.float64).reshape(shape)
        if self.k is None:
            d = np.asarray(delta, dtype=np.float64)
            chans = [d]
        else:
            chans = list(np.asarray(delta, dtype=np.float64))
            d = np.mean(np.asarray(delta, dtype=np.float64), axis=0)
        g2 = d * d + 1e-30
        if not st:
            st["m"] = [np.zeros(shape) for _ in range(3)]
            st["rms"] = np.zeros(shape)
        for i in range(3):
            st["m"][i] = b[i] * st["m"][i] + (1 - b[i]) * d
        st["rms"] = b[3] * st["rms"] + (1 - b[3]) * d * d
        m, rms = st["m"], st["rms"]

        def rsqrt_safe(x):
            return 1.0 / np.sqrt(np.maximum(x, 1e-9))

        feats = [w, *m, rms, *[mi / np.sqrt(rms + 1e-6) for mi in m], 1 / np.sqrt(rms + 1e-6)]
        if len(shape) >= 2:
            order = np.argsort(np.asarray(shape), kind="stable")
            d1, d0 = int(order[-2]), int(order[-1])
            if "vr" not in st:
                st["vr"] = [np.zeros(np.delete(shape, d0)) for _ in range(3)]
                st["vc"] = [np.zeros(np.delete(shape, d1)) for _ in range(3)]
            for i in range(3):
                bi = b[4 + i]
                st["vr"][i] = bi * st["vr"][i] + (1 - bi) * np.mean(g2, axis=d0)
                st["vc"][i] = bi * st["vc"][i] + (1 - bi) * np.mean(g2, axis=d1)
            red_d1 = d1 - 1 if d1 > d0 else d1
            rowf = [np.broadcast_to(np.expand_dims(vr, d0), shape) for vr in st["vr"]]
            colf = [np.broadcast_to(np.expand_dims(vc, d1), shape) for vc in st["vc"]]
            facs = []
            for vr, vc in zip(st["vr"], st["vc"]):
                row_factor = rsqrt_safe(vr / (np.mean(vr, axis=red_d1, keepdims=True) + 1e-9))
                facs.append(np.expand_dims(row_factor, d0) * np.expand_dims(rsqrt_safe(vc), d1))
            fac_g = [d * f for f in facs]
            fac_m = [mi * f for mi, f in zip(m, facs)]
        else:
            if "vd" not in st:
                st["vd"] = [np.zeros(shape) for _ in range(3)]
            for i in range(3):
                st["vd"][i] = b[4 + i] * st["vd"][i] + (1 - b[4 + i]) * g2
            rowf = colf = st["vd"]
            fac_g = [d * rsqrt_safe(v + 1e-9) for v in st["vd"]]
            fac_m = [mi * (v + 1e-6) ** -0.5 for mi, v in zip(m, st["vd"])]
        feats += fac_g + list(rowf) + list(colf)
        feats += [1 / np.sqrt(x + 1e-8) for x in rowf] + [1 / np.sqrt(x + 1e-8) for x in colf]
        feats += fac_m + chans
        n = int(np.prod(shape)) if len(shape) else 1
        columns = [f.reshape(n) / np.sqrt(1e-5 + np.mean(np.square(f))) for f in feats]
        columns += [np.full(n, math.tanh(self.t / float(x) - 1.0)) for x in TIME_SCALES]
        out = np.stack(columns, axis=1)
        assert out.shape == (n, self.n_in), out.shape
        return out

    def features(self, params, deltas):
        """Advance the accumulators by one round and return, per leaf, the (N, n_in) feature matrix
        (N = number of elements of the leaf, rows in C order of the original shape, columns in the
        documented order). For LAgg-A each delta leaf has shape (k,) + param shape (worker stack) and the
        accumulators use the mean over axis 0. Increments the round counter t after computing features."""
        assert len(params) == len(self.shapes) and len(deltas) == len(self.shapes)
        out = [self._leaf_features(i, params[i], deltas[i]) for i in range(len(self.shapes))]
        self.t += 1
        return out

    def step(self, params, deltas):
        """features(...) then the MLP and the update rule; returns the updates (same shapes as params)."""
        feats = self.features(params, deltas)
        updates = []
        for i, x in enumerate(feats):
            out = mlp_apply(self.mlp, x)
            d_out = out[:, 0]
            m_out = out[:, 1]
            upd = -self.step_mult * d_out * np.exp(self.exp_mult * m_out)
            updates.append(upd.reshape(self.shapes[i]))
        return updates
