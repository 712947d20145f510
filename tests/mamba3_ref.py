"""A float64 numpy reference of the Mamba-3 layer (SISO and MIMO), written from the spec
(../shared/spec/mamba.md section 4), in two independent forms:

- `recurrent`: token by token, the trapezoidal recurrence with its angle, SSM, k and v states
  (section 4.4 steps 1-9 and the decode step of 4.6);
- `attention`: the equivalent quadratic ("attention", chunked-kernel) form of section 4.4, the
  coefficient of x_s (x) k'_s at time t being scale_s * exp(sum_{r=s+1..t} ADT_r) off the
  diagonal and gamma_t on it, the initial state entering as (h0 + (1-lambda_0) DT_0 v0 (x) k0)
  decayed by exp(cumsum ADT).

Both take the layer's weights by the names of section 4.3 (relative to `mixer.`) and a config
dict with the layer entry's fields (d_inner, d_state, headdim, nheads, ngroups, mimo_rank,
rope_fraction, is_outproj_norm, a_activation, a_floor). States are a dict: angle (H, S),
ssm (H, P, N), k (Rm, H, N) (rotated), v (H, P) (raw x). Rotation: pairwise (2i, 2i+1) for
SISO, halved (i, i + N/2) for MIMO, as the module does (section 4.5).
"""

from __future__ import annotations

import numpy as np

EPS = 1e-5  # B/C norms and the per-head output norm


def sizes(c: dict) -> dict:
    E, N, P = c["d_inner"], c["d_state"], c["headdim"]
    H, G = c["nheads"], c["ngroups"]
    Rm = c["mimo_rank"] if c["is_mimo"] else 1
    split = int(N * c["rope_fraction"])
    split -= split % 2
    S = split // 2
    return dict(E=E, N=N, P=P, H=H, G=G, Rm=Rm, S=S, Din=2 * E + 2 * N * G * Rm + 3 * H + S)


def _softplus(x):
    return np.where(x > 20.0, x, np.log1p(np.exp(np.minimum(x, 20.0))))


def _a_act(x, kind):
    if kind == "softplus":
        return _softplus(x)
    return np.where(x >= 0, 1.0 + x, 1.0 / (1.0 - np.minimum(x, 0.0)))


def _rms(v, w):
    return v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + EPS) * w


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _rotate(v, theta, halved):
    """v (..., N) rotated by theta (..., S): pairs (2i, 2i+1) or (i, i + N/2), i < S."""
    v = v.copy()
    S = theta.shape[-1]
    N = v.shape[-1]
    c, s = np.cos(theta), np.sin(theta)
    if halved:
        a, b = v[..., :S].copy(), v[..., N // 2:N // 2 + S].copy()
        v[..., :S] = a * c - b * s
        v[..., N // 2:N // 2 + S] = a * s + b * c
    else:
        a, b = v[..., 0:2 * S:2].copy(), v[..., 1:2 * S:2].copy()
        v[..., 0:2 * S:2] = a * c - b * s
        v[..., 1:2 * S:2] = a * s + b * c
    return v


def zero_state(c: dict) -> dict:
    z = sizes(c)
    return dict(angle=np.zeros((z["H"], z["S"])), ssm=np.zeros((z["H"], z["P"], z["N"])),
                k=np.zeros((z["Rm"], z["H"], z["N"])), v=np.zeros((z["H"], z["P"])))


def _prepare(u, w, c):
    """Per-token quantities of section 4.4 steps 1-5 (rotation after the angle update)."""
    z = sizes(c)
    E, N, P, H, G, Rm, S = (z[k] for k in ("E", "N", "P", "H", "G", "Rm", "S"))
    f = lambda k: np.asarray(w[k], np.float64)  # noqa: E731
    proj = np.asarray(u, np.float64) @ f("in_proj.weight").T
    L = proj.shape[0]
    o = 0
    zz = proj[:, o:o + E].reshape(L, H, P); o += E
    x = proj[:, o:o + E].reshape(L, H, P); o += E
    Bm = proj[:, o:o + N * G * Rm].reshape(L, Rm, G, N); o += N * G * Rm
    Cm = proj[:, o:o + N * G * Rm].reshape(L, Rm, G, N); o += N * G * Rm
    dd_dt = proj[:, o:o + H]; o += H
    dd_A = proj[:, o:o + H]; o += H
    trap = proj[:, o:o + H]; o += H
    ang = proj[:, o:o + S]; o += S
    A = np.minimum(-_a_act(dd_A, c["a_activation"]), -c["a_floor"])
    DT = _softplus(dd_dt + f("dt_bias"))
    lam = 1.0 / (1.0 + np.exp(-trap))
    Bn = _rms(Bm, f("B_norm.weight"))
    Cn = _rms(Cm, f("C_norm.weight"))
    grp = np.arange(H) // (H // G)
    k = Bn[:, :, grp, :] + f("B_bias").transpose(1, 0, 2)[None]  # (L, Rm, H, N)
    q = Cn[:, :, grp, :] + f("C_bias").transpose(1, 0, 2)[None]
    if c["is_mimo"]:
        mx, mz, mo = f("mimo_x"), f("mimo_z"), f("mimo_o")  # (H, Rm, P)
    else:
        mx = mz = mo = np.ones((H, 1, P))
    return dict(z=zz, x=x, k=k, q=q, A=A, DT=DT, lam=lam, ang=ang, mx=mx, mz=mz, mo=mo, L=L,
                **z)


def _angles(p, theta0):
    """theta_t (L, H, S) = (theta_{t-1} + pi tanh(ang_t) DT_t) mod 2 pi."""
    th = np.array(theta0, np.float64)
    out = []
    for t in range(p["L"]):
        th = np.mod(th + np.pi * np.tanh(p["ang"][t])[None, :] * p["DT"][t][:, None], 2 * np.pi)
        out.append(th.copy())
    return np.stack(out) if out else np.zeros((0,) + th.shape), th


def _output(p, y_r, w, c, t):
    """Gate (or per-head norm + gate), then the rank sum: (H, P)."""
    zr = p["z"][t][:, None, :] * p["mz"]  # (H, Rm, P)
    if c["is_outproj_norm"]:
        nw = np.asarray(w["norm.weight"], np.float64).reshape(p["H"], 1, p["P"])
        y_r = _rms(y_r, nw) * _silu(zr)
    else:
        y_r = y_r * _silu(zr)
    return np.sum(y_r * p["mo"], axis=1)


def recurrent(u, w, c, state=None):
    """out (L, d) and the final state, token by token."""
    p = _prepare(u, w, c)
    st = {k: np.array(v, np.float64) for k, v in (state or zero_state(c)).items()}
    halved = bool(c["is_mimo"])
    thetas, st["angle"] = _angles(p, st["angle"])
    h = st["ssm"]
    k_prev, v_prev = st["k"], st["v"]  # (Rm, H, N), (H, P)
    ys = []
    for t in range(p["L"]):
        kr = _rotate(p["k"][t], thetas[t][None], halved)  # (Rm, H, N)
        qr = _rotate(p["q"][t], thetas[t][None], halved)
        alpha = np.exp(p["A"][t] * p["DT"][t])  # (H)
        beta = (1 - p["lam"][t]) * p["DT"][t] * alpha
        gamma = p["lam"][t] * p["DT"][t]
        xr = p["x"][t][:, None, :] * p["mx"]  # (H, Rm, P)
        vr = v_prev[:, None, :] * p["mx"]
        h = (alpha[:, None, None] * h
             + beta[:, None, None] * np.einsum("hrp,rhn->hpn", vr, k_prev)
             + gamma[:, None, None] * np.einsum("hrp,rhn->hpn", xr, kr))
        y_r = np.einsum("hpn,rhn->hrp", h, qr) + np.asarray(w["D"], np.float64)[:, None, None] * xr
        ys.append(_output(p, y_r, w, c, t).reshape(-1))
        k_prev, v_prev = kr, p["x"][t]
    st.update(ssm=h, k=k_prev, v=v_prev)
    y = np.stack(ys) if ys else np.zeros((0, p["E"]))
    return y @ np.asarray(w["out_proj.weight"], np.float64).T, st


def attention(u, w, c, state=None):
    """out (L, d) by the quadratic form (no recurrence over h)."""
    p = _prepare(u, w, c)
    st = {k: np.array(v, np.float64) for k, v in (state or zero_state(c)).items()}
    halved = bool(c["is_mimo"])
    thetas, _ = _angles(p, st["angle"])
    L, H = p["L"], p["H"]
    kr = np.stack([_rotate(p["k"][t], thetas[t][None], halved) for t in range(L)])  # (L,Rm,H,N)
    qr = np.stack([_rotate(p["q"][t], thetas[t][None], halved) for t in range(L)])
    xr = p["x"][:, :, None, :] * p["mx"][None]  # (L, H, Rm, P)
    ADT = p["A"] * p["DT"]  # (L, H)
    cum = np.cumsum(ADT, axis=0)  # cum[t] = sum_{r<=t}
    DT, lam = p["DT"], p["lam"]
    D = np.asarray(w["D"], np.float64)
    v0 = st["v"][:, None, :] * p["mx"]  # (H, Rm, P)
    h0 = st["ssm"] + ((1 - lam[0]) * DT[0])[:, None, None] * np.einsum("hrp,rhn->hpn", v0,
                                                                        st["k"])
    ys = []
    for t in range(L):
        y_r = np.zeros((H, p["Rm"], p["P"]))
        for s in range(t + 1):
            if s == t:
                coef = lam[t] * DT[t]
            else:
                scale = DT[s] * lam[s] + DT[s + 1] * (1 - lam[s + 1])
                coef = scale * np.exp(cum[t] - cum[s])
            # (q'_t,r . k'_s,r') x_s,r' summed over r'
            dots = np.einsum("rhn,shn->hrs", qr[t], kr[s])  # (H, Rm_q, Rm_k)
            y_r += coef[:, None, None] * np.einsum("hrs,hsp->hrp", dots, xr[s])
        y_r += np.exp(cum[t])[:, None, None] * np.einsum("hpn,rhn->hrp", h0, qr[t])
        y_r += D[:, None, None] * xr[t]
        ys.append(_output(p, y_r, w, c, t).reshape(-1))
    y = np.stack(ys)
    return y @ np.asarray(w["out_proj.weight"], np.float64).T


def random_weights(c: dict, d_model: int, rng) -> dict:
    """Weights of a sensible scale (section 4.3 names, relative to `mixer.`)."""
    z = sizes(c)
    H, P, N, Rm, E = z["H"], z["P"], z["N"], z["Rm"], z["E"]
    w = {"in_proj.weight": rng.standard_normal((z["Din"], d_model)) / np.sqrt(d_model),
         "dt_bias": np.log(np.expm1(np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), H)))),
         "B_bias": 1.0 + 0.1 * rng.standard_normal((H, Rm, N)),
         "C_bias": 1.0 + 0.1 * rng.standard_normal((H, Rm, N)),
         "B_norm.weight": 1.0 + 0.1 * rng.standard_normal(N),
         "C_norm.weight": 1.0 + 0.1 * rng.standard_normal(N),
         "D": np.ones(H) + 0.1 * rng.standard_normal(H),
         "out_proj.weight": rng.standard_normal((d_model, E)) / np.sqrt(E)}
    if c["is_mimo"]:
        w["mimo_x"] = 1.0 / Rm + 0.1 * rng.standard_normal((H, Rm, P))
        w["mimo_z"] = 1.0 + 0.1 * rng.standard_normal((H, Rm, P))
        w["mimo_o"] = 1.0 / Rm + 0.1 * rng.standard_normal((H, Rm, P))
    if c["is_outproj_norm"]:
        w["norm.weight"] = 1.0 + 0.1 * rng.standard_normal(E)
    return {k: np.asarray(v, np.float32) for k, v in w.items()}


# ---- the scan op alone (Backend::mamba3_scan through _C._ops) -------------------------------


def scan_case(c: dict, B: int, L: int, rng, state_scale=1.0):
    """Random inputs of the scan op for config `c`: proj (B, L, Din) and the layer's small
    parameters (random_weights), with random input states (angle in [0, 2 pi), the rest scaled
    by `state_scale`; 0 gives zero states). Returns (op args tuple, weights, states per row)."""
    z = sizes(c)
    H, P, N, Rm, S, G = z["H"], z["P"], z["N"], z["Rm"], z["S"], z["G"]
    w = random_weights(c, 4, rng)
    proj = rng.standard_normal((B, L, z["Din"])).astype(np.float32)
    st = dict(angle=rng.uniform(0, 2 * np.pi, (B, H, S)),
              ssm=state_scale * rng.standard_normal((B, H, P, N)),
              k=state_scale * rng.standard_normal((B, Rm, H, N)),
              v=state_scale * rng.standard_normal((B, H, P)))
    st = {k: v.astype(np.float32) for k, v in st.items()}
    mimo = bool(c["is_mimo"])
    args = (proj, w["dt_bias"], w["B_bias"], w["C_bias"], w["B_norm.weight"], w["C_norm.weight"],
            w["D"], w.get("mimo_x") if mimo else None, w.get("mimo_z") if mimo else None,
            w.get("mimo_o") if mimo else None, w.get("norm.weight"), st["angle"], st["ssm"],
            st["k"], st["v"], G, mimo, c["a_activation"] == "softplus", c["a_floor"], EPS)
    return args, w, st


def scan_reference(c: dict, args, w, st):
    """The float64 recurrent form of the scan op (identity in_proj and out_proj):
    (y (B, L, E), angle, ssm, k, v) as the op returns them."""
    z = sizes(c)
    proj = np.asarray(args[0], np.float64)
    B = proj.shape[0]
    ww = dict(w)
    ww["in_proj.weight"] = np.eye(z["Din"])
    ww["out_proj.weight"] = np.eye(z["E"])
    ys, outs = [], {k: [] for k in ("angle", "ssm", "k", "v")}
    for b in range(B):
        y, s = recurrent(proj[b, :, :z["Din"]], ww, c, {k: v[b] for k, v in st.items()})
        ys.append(y)
        for k in outs:
            outs[k].append(s[k])
    return (np.stack(ys),) + tuple(np.stack(outs[k]) for k in ("angle", "ssm", "k", "v"))
