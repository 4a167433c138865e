"""What a fully connected layer's gradient gives away exactly: its input (one image), each image's
input and output gradient (batches whose gradient at the layer's output is sparse enough), and from
those the labels."""
import math

import torch
import torch.nn.functional as F


def recover_fc_input(weight_grad, bias_grad):
    """Input of a linear layer from its gradients, batch size 1: rows of dW are dL/db_i * input.

    Least squares over all rows (weighted by dL/db_i), so it is exact whenever any dL/db_i != 0.
    weight_grad (N, out, in), bias_grad (N, out) -> (N, in).
    """
    return torch.einsum('no,noi->ni', bias_grad, weight_grad) / bias_grad.pow(2).sum(1, keepdim=True).clamp_min(1e-30)


def separate_batch(weight_grad, bias_grad, batch_size, nonnegative=True, layer=None, seed=0, max_samples=2_000_000,
                   patience=400_000, chunk=20_000, settle=3, gaps=(100.0, 30.0)):
    """Each image's fc1 input and output gradient from one batch gradient, after SPEAR (Dimitrov et al. 2024);
    None where it does not work out.

    dL/dW = D X^T with D (out, B) the images' gradients at fc1's output and X (in, B) their inputs. Its rank-B
    factorisation U R (SVD) equals it up to an unknown invertible Q: D = U Q, X^T = Q^-1 R. D is sparse --
    a unit is 0 for every image it is inactive for (ReLU) or dropped (dropout) -- so each column q of Q makes
    U q vanish on many rows. Pick B-1 rows at random (batched linear solves, `chunk` picks at a time): if
    they are all zeros of one image's column, their null vector is that column's q, and U q vanishes on all
    of that column's zeros (told from non-zeros by a gap of 100x, else 30x: see vanishing and below). A
    mixture of two columns vanishes on the zeros both share, plus a row where they cancel: fewer than either,
    and in the span of two columns once those are known, so such candidates are dropped, and the batch's
    columns are the B independent candidates that vanish on the most rows, once they stay the same for
    `settle` chunks. The scales come from the bias gradient, dL/db = D 1 = U Q s (least squares). Returns (X^T (B, in),
    B * D^T (B, out), ok (B,)) in no particular order; ok is False for an image whose input came out negative
    somewhere (after a ReLU it cannot be), or, given the layer's (weight, bias), that a unit passes gradient
    to although its pre-activation is not positive, and for one left out (zeros; see below). The picks are seeded
    (`seed`): which images separate does not depend on anything attacked before. The chance that B-1 picks are
    all zeros of one column falls like (zero fraction)^(B-1): with ~75 % zeros (ReLU and dropout unknown, the
    trained CNN) it works to B = 16-24; with dropout off (~50 % zeros) to B = 8; not at B = 32
    (benchmarks/bench_leakage_map.py), where separate_by_inputs does.
    """
    Wg, bg = weight_grad.double(), bias_grad.double()
    U, S, Vh = torch.linalg.svd(Wg, full_matrices=False)
    if batch_size > min(Wg.shape) or S[batch_size - 1] <= 1e-6 * S[0]:
        return None  # fewer than B independent images (a repeated image, say): not separable this way
    # An image the model is very sure of has a gradient ~1e-5 of the others': its column is partly outside the
    # top-B singular vectors (fp32 rounding), so its zeros are noisier -- seed 12's B = 16 batch has two at 2e-4
    # of the row beside non-zeros at 1e-2, under a 100x gap. Where 100x does not give all B columns, 30x is
    # tried (not first: on seed 13 it took a wrong column where 100x took none; tuned on seeds 11-13), and only
    # where 100x came within two columns (far short of them, as at B = 32, it finds junk); then the batch is
    # taken as the B - 1 (then B - 2) images above the smallest, and the one left out is not recovered.
    generator = torch.Generator().manual_seed(seed)
    for B in range(batch_size, max(batch_size - 3, 1), -1):
        for gap in gaps:
            out, found = _separate_rank(U[:, :B], S[:B, None] * Vh[:B], Wg, bg, generator, nonnegative, layer,
                                        max_samples, patience, chunk, settle, gap)
            if out is not None:
                return _with_left_out(*out, batch_size, weight_grad.dtype)
            if found < B - 2:
                break
    return None


def _separate_rank(L, R, Wg, bg, generator, nonnegative, layer, max_samples, patience, chunk, settle, gap):
    """separate_batch for B = L.shape[1] images with Wg ~ L R: ((X^T (B, in), D (out, B), ok (B,)) or None, how
    many independent columns it found).
    Gives up after `patience` picks that found no new candidate, or that did not change the chosen columns
    (junk candidates -- mixtures of three or more columns -- can keep coming without changing them)."""
    B = L.shape[1]
    live = (L.norm(dim=1) > 1e-9).nonzero().flatten()  # units some image moves; the rest say nothing
    if len(live) < B + 2:
        return None, 0
    Ll = L[live]
    row_norm = Ll.norm(dim=1)
    pool, pool_zeros, pool_masks = [], [], []  # distinct candidate columns, their zeros
    tried, since_new, unchanged = 0, 0, 0
    chosen, same_for = [], 0  # the B most vanishing independent candidates, and for how many chunks so far
    while tried < max_samples and since_new < patience and unchanged < patience and same_for < settle:
        pick = torch.rand(chunk, len(live), generator=generator).argsort(1)[:, :B - 1]
        A = Ll[pick.to(L.device)]  # (chunk, B-1, B)
        # the null vector q = (q', 1) of each B-1 rows: A[:, :, :-1] q' = -A[:, :, -1]
        sol, info = torch.linalg.solve_ex(A[..., :-1], -A[..., -1])
        q = torch.cat([sol, torch.ones_like(sol[:, :1])], 1)
        q = q[(info == 0) & q.isfinite().all(1)]
        q = q / q.norm(dim=1, keepdim=True)
        zeros = vanishing((q @ Ll.T).abs() / row_norm, B - 1, gap).sum(1)
        keep = zeros >= B + 2  # more than the B-1 rows each was solved on
        if pool and keep.any():  # columns already found come up again and again (a raw solve is less exact),
            keep[keep.clone()] = (q[keep] @ torch.stack(pool).T).abs().amax(1) < 1 - 1e-4  # and so do
            keep[keep.clone()] = ~_mixture_of_two(q[keep], pool, pool_zeros, zeros[keep])  # their mixtures
        q = q[keep][zeros[keep].argsort(descending=True)]
        tried, since_new = tried + chunk, since_new + chunk
        for _ in range(4 * B):  # the most vanishing distinct candidates of this chunk
            if not len(q):
                break
            c = first = q[0]
            for _ in range(2):  # the null vector of all the rows it vanishes on is the better estimate
                zero = vanishing(((Ll @ c).abs() / row_norm)[None], B - 1, gap)[0]
                if zero.sum() < B + 2:
                    break
                _, sv, vh = torch.linalg.svd(Ll[zero], full_matrices=False)
                c = vh[-1]
            q = q[((q @ c).abs() < 1 - 1e-4) & ((q @ first).abs() < 1 - 1e-4)]
            if zero.sum() < B + 2 or sv[-2] < 10 * sv[-1]:
                continue  # the rows have no null vector, or several
            same = [i for i, p in enumerate(pool) if (p @ c).abs() > 1 - 1e-6]
            if same:  # seen before: keep the estimate that vanishes on more rows
                if int(zero.sum()) > pool_zeros[same[0]]:
                    pool[same[0]], pool_zeros[same[0]], pool_masks[same[0]] = c, int(zero.sum()), zero
                continue
            pool.append(c)
            pool_zeros.append(int(zero.sum()))
            pool_masks.append(zero)
            since_new = 0
        before, chosen = chosen, _most_vanishing(pool, pool_zeros, B)
        same_for = same_for + 1 if len(chosen) == B and chosen == before else 0
        unchanged = unchanged + chunk if chosen == before else 0
    if len(chosen) < B:
        return None, len(chosen)
    Q = torch.stack([pool[i] for i in chosen], 1)  # (B, B)
    D = L @ Q
    s = torch.linalg.lstsq(D, bg[:, None]).solution[:, 0]  # dL/db = sum of the columns, each at its scale
    Xt = torch.linalg.solve(Q, R) / s[:, None]  # (B, in)
    D = D * s
    if (D @ Xt - Wg).norm() > 1e-3 * Wg.norm() or (D.sum(1) - bg).norm() > 1e-3 * bg.norm():
        return None, B
    # an image whose column came out wrong is flagged: fc1's input is never negative after a ReLU, and a unit
    # that passes gradient to an image is active for it (pre-activation > 0). Nothing else checks a column:
    # any invertible Q reproduces the weight and bias gradients.
    ok = Xt.isfinite().all(1) & (_nonnegative(Xt, 1e-3) if nonnegative else True)
    if layer is not None:
        z = (Xt @ layer[0].double().T + layer[1].double())[:, live]  # (B, live units)
        passes = ~torch.stack([pool_masks[i] for i in chosen])  # the units each image's column is non-zero on
        ok &= ~(passes & (z <= 0)).any(1)
    return ((Xt, D, ok) if ok.any() else None), B  # none passing the checks is no separation


def _most_vanishing(pool, pool_zeros, B):
    """Indices of the (up to) B candidates that vanish on the most rows and are independent (rtol 1e-3 also
    keeps two estimates of one column from both being taken)."""
    order = sorted(range(len(pool)), key=lambda i: -pool_zeros[i])
    return [order[i] for i in _independent([pool[j] for j in order], B)]


def _mixture_of_two(q, pool, pool_zeros, zeros):
    """Which candidates q (n, B) lie in the span of two candidates of the pool and vanish on no more rows than
    the fewer of those two (+1): mixtures of two columns, which keep coming up once two columns are known."""
    if len(pool) < 2 or not len(q):
        return torch.zeros(len(q), dtype=torch.bool, device=q.device)
    order = sorted(range(len(pool)), key=lambda i: -pool_zeros[i])[:2 * q.shape[1]]  # the likeliest columns
    pairs = torch.tensor([(i, j) for a, i in enumerate(order) for j in order[a + 1:]], device=q.device)
    basis = torch.linalg.qr(torch.stack(pool)[pairs].transpose(1, 2)).Q  # (pairs, B, 2)
    inside = 1 - torch.einsum('nb,pbk->npk', q, basis).pow(2).sum(2) < 1e-8  # (n, pairs)
    fewer = torch.tensor(pool_zeros, device=q.device)[pairs].amin(1) + 1  # (pairs,)
    return (inside & (zeros[:, None] <= fewer[None])).any(1)


def vanishing(values, at_least, gap=100.0):
    """Which of each row's non-negative `values` (n, m) are zeros: those below the widest gap (at least `gap`
    times) in the row's sorted values that has more than `at_least` of them below it; none where there is no
    such gap.
    A column's exact zeros are rounding noise, whose level depends on how small the image's gradient is
    next to the batch's others (1e-8 to 1e-5 of the row on a trained model), and its non-zeros are far above."""
    ordered = values.sort(1).values.clamp_min(1e-300).log10()
    steps = ordered[:, 1:] - ordered[:, :-1]  # step after each position, in decades
    steps[:, :at_least] = 0  # at least at_least + 1 below: the rows a candidate was solved on are exact zeros
    widest, at = steps.max(1)
    below = ordered.gather(1, at[:, None])[:, 0]
    limit = torch.where(widest >= math.log10(gap), below, torch.full_like(widest, -1e300))
    return values.clamp_min(1e-300).log10() <= limit[:, None]


def output_errors(model, a2, d, ok=None):
    """Each separated image's p - onehot(y) at the model's output, (N, classes), from its fc1 input a2 (N, in) and
    its gradient at fc1's output d (N, 128); NaN rows where not read: ok[i] False (the image came out wrong) or
    left out (d[i] all zero). An image found by its input alone (ok, d[i] all zero: inputs_alone) is read off the
    model's own prediction of it, p - onehot(argmax p): the attacker's best guess, as its gradient is not known.

    Where unit k passes gradient, d_k = s * (W_fc2^T (p - onehot(y)))_k: solving on those units gives p - onehot(y)
    times s. s is 1 without dropout and 1 / keep for a kept unit under dropout; which it is the image says itself:
    a unit that is active (pre-activation > 0, from a2) but passes no gradient was dropped. The label is the only
    negative entry (as iDLG's).
    """
    a2, d = a2.double(), d.double()  # the left-out images' labels are read from what these leave (invert.py)
    w1, b1, w2 = (t.double() for t in (model.fc1.weight, model.fc1.bias, model.fc2.weight))
    active = (a2 @ w1.T + b1) > 0
    keep = 1 - model.dropout.p
    out = torch.full((len(d), len(w2)), math.nan, dtype=d.dtype, device=d.device)
    alone = ~d.any(1)
    alone &= torch.zeros_like(alone) if ok is None else ok.to(d.device)
    if alone.any():
        p = torch.softmax(torch.relu(a2[alone] @ w1.T + b1) @ w2.T + model.fc2.bias.double(), 1)
        out[alone] = p - F.one_hot(p.argmax(1), len(w2)).to(p)
    for i, row in enumerate(d):
        if (ok is not None and not ok[i]) or not row.any():
            continue
        passes = row.abs() > 1e-6 * row.abs().max()
        scale = 1 / keep if (active[i] & ~passes).any() else 1.0
        out[i] = torch.linalg.lstsq(w2[:, passes].T, row[passes, None]).solution[:, 0] / scale
    return out


def separate_by_inputs(weight_grad, bias_grad, batch_size, layer, output_weight, zero_rate, seed=0, chunk=4_000,
                       patience=20, votes=3):
    """Each image's fc1 input and output gradient from one batch gradient, found from the inputs' side: the
    separation for batches too large for separate_batch (B = 32 on the trained CNN). Same return (the images it
    finds; the rest zeros with ok False), None where it finds none.

    With dL/dW = D X^T = (U Q)(Q^-1 R) as in separate_batch, a row p of P = Q^-1 gives an image's input p^T R,
    and fc1's input is sparse too (ReLU, max-pool): about a quarter of its features are 0 for an image, some
    for nearly every image. B-1 features picked with weight zero_rate^8 (zero_rate: how often each feature is
    0 on the attacker's public images), all zeros of one image, make p that image's row -- approximately,
    and at its true scale since dL/db = D 1 gives t = Q 1 and p^T t = 1. Its input then says which fc1 units
    are inactive for the image, which its gradient must vanish on: the one null vector of U on those rows is
    the image's column q, exactly; a column counts once found by `votes` picks and if it passes `certified`.
    Images whose column is not pinned this way (another image's gradient vanishes on the same units, or the
    image's gradient is at rounding level) are looked for again among the rows orthogonal to the columns
    found (a space of few dimensions, where picks are cheap). Each found image's input is its row of P:
    orthogonal to the other columns found, and vanishing where its picks did; the gradient's scale from
    p^T (s q) = 1. At B = 64 an image's ~70 inactive units no longer pin its column (bench_leakage_map.py).
    The constants (the weight's power 8, 3 votes, the null-space and certificate thresholds) were chosen on tuning
    seeds 11-14 (B = 16, 32; exact inputs against the true ones), never on the reported seed 0.
    """
    Wg, bg = weight_grad.double(), bias_grad.double()
    W1, b1, W2 = (w.detach().double() for w in (*layer, output_weight))
    B = batch_size
    U, S, Vh = torch.linalg.svd(Wg, full_matrices=False)
    if B > min(Wg.shape) or S[B - 1] <= 1e-6 * S[0]:
        return None
    L, R = U[:, :B], S[:B, None] * Vh[:B]
    t = L.T @ bg
    norm = R.norm(dim=0)
    live = (norm > 1e-9 * norm.max()).nonzero().flatten()  # features some image has; the rest say nothing
    R_live = R[:, live]
    logw = 8 * zero_rate.to(R).clamp_min(1e-3).log()[live]
    generator = torch.Generator().manual_seed(seed)

    def column(x):  # the column whose gradient vanishes on the units x leaves inactive, or None
        inactive = (x @ W1[:, live].T + b1) <= 0
        one, q = _null_vectors(L, inactive[None])
        return q[0] if one[0] and certified(L @ q[0], W2) else None

    columns, zeros = _columns_by_votes(L, R_live, t, logw, W1[:, live], b1, W2, generator, chunk, patience, votes)
    while 0 < len(columns) < B:  # the missing images' rows are orthogonal to the columns found
        C = torch.linalg.svd(torch.stack(columns), full_matrices=True)[2][len(columns):].T  # (B, k)
        found = 0
        for c in _sparsest_rows(C.T @ R_live, C.T @ t, logw / 4, generator, chunk, patience):
            x = c @ C.T @ R_live
            q = column(x)
            if q is not None and all((q @ f).abs() < 1 - 1e-6 for f in columns):
                columns.append(q)
                zeros.append(_near_zero(x))
                found += 1
        if not found:
            break
    if not columns:
        return None
    Xt, D = _inputs_and_gradients(torch.stack(columns, 1), zeros, L, R, R_live, t, generator)
    ok = _nonnegative(Xt, 1e-3) & Xt.isfinite().all(1)
    passes = D.T.abs() > 1e-4 * D.T.abs().amax(1, keepdim=True)
    ok &= ~(passes & ((Xt @ W1.T + b1) <= 0)).any(1)  # a unit passing gradient is active for the image
    return _with_left_out(Xt, D, ok, B, weight_grad.dtype) if ok.any() else None


def inputs_alone(weight_grad, bias_grad, batch_size, zero_rate, model, known=None, seed=0, chunk=4_000,
                 patience=20, refine=200, trials=20_000):
    """Images' fc1 inputs, and where it can be told their gradients, for batches whose columns no longer separate
    by votes (B = 64 on the trained CNN, where the units an image leaves inactive are inactive for ~15 others):
    (X^T (f, in), D (f, out), zero rows where an image's gradient was not found) for the f images found besides
    the `known` ones (their inputs (k, in) and gradients (k, out), as a separation gives them), None where none
    is.

    Candidates as separate_by_inputs' (B-1 features picked with weight zero_rate^8, p^T t = 1). A candidate
    that is an image's input vanishes on the image's zeros -- hundreds of features, where B-1 were asked for --
    and on those features the row space has that one direction: the candidate is refined to it, and counts if the
    next direction is well away (singular value above 0.03 of 1 in the row space's orthonormal basis, where the
    batch's small gradients do not hide it) and the input is non-negative (to 1e-4: a near-miss mixture of two
    images dips to -1e-3). Picks are weighted for the images not found yet (the public zero rate less the found
    images' zeros), until `patience` chunks find no new image. An image whose gradient is found too (gradient_of)
    is its own term d x^T / B of the batch gradient: taken out, the rest factor with fewer images (fewer picks
    must all be zeros; smaller null spaces for gradient_of), and the search goes on until a round finds no new
    image and no new gradient. The terms taken out carry the found inputs' error (~1e-4 of them), which hides the
    images whose gradients are smaller still (tuning seed 11, B = 64: 64, 53 then 41 images left, 33 found).
    Chosen on tuning seeds 11-14, never on the reported seed 0."""
    Wg, bg = weight_grad.double(), bias_grad.double()
    B = batch_size
    if B > min(Wg.shape):
        return None
    norm = Wg.norm(dim=0)
    live = (norm > 1e-9 * norm.max()).nonzero().flatten()
    rate = zero_rate.to(Wg)[live]
    generator = torch.Generator().manual_seed(seed)
    found = Wg.new_zeros(0, len(live)) if known is None else known[0].to(Wg)[:, live]
    k = len(found)
    grads = [None] * k if known is None else [d.to(Wg) for d in known[1]]
    tried = [-1] * len(found)  # how many images were taken out when gradient_of last tried each found input
    while len(found) < B:
        # an image with both its input and gradient known is its own term of the batch gradient: taken out, the
        # others' factorisation has that many fewer images
        pairs = [i for i, d in enumerate(grads) if d is not None]
        W_rest, b_rest = Wg[:, live].clone(), bg.clone()
        for i in pairs:
            W_rest -= torch.outer(grads[i], found[i]) / B
            b_rest -= grads[i] / B
        m = B - len(pairs)
        if m == 0:
            break
        U, S, Vh = torch.linalg.svd(W_rest, full_matrices=False)
        L, R = U[:, :m], S[:m, None] * Vh[:m]
        noise = (S[m] / S[m - 1]).item() if m < len(S) else 0.0  # what the m images' terms leave, relative
        more = _inputs_in(R, L.T @ b_rest, B, rate, found, generator, chunk, patience, refine, noise)
        found = torch.cat([found, more])
        grads += [None] * len(more)
        tried += [-1] * len(more)
        new = 0
        for i in range(len(found)):
            if grads[i] is None and tried[i] < len(pairs):  # fewer images left, fewer directions to tell apart
                x = Wg.new_zeros(Wg.shape[1])
                x[live] = found[i]
                grads[i], tried[i] = gradient_of(x, L, model, generator, trials), len(pairs)
                new += grads[i] is not None
        if not len(more) and not new:
            break
    if len(found) == k:
        return None
    Xt = Wg.new_zeros(len(found) - k, Wg.shape[1])
    Xt[:, live] = found[k:]
    D = torch.stack([Wg.new_zeros(Wg.shape[0]) if d is None else d for d in grads[k:]])
    return Xt.to(weight_grad.dtype), D.to(weight_grad.dtype)


def _inputs_in(Rb, tb, B, rate, found, generator, chunk, patience, refine, noise=0.0):
    """New images' inputs (n, features) in the space spanned by Rb's rows (m, features), p^T tb = 1: see
    inputs_alone. noise: the next singular value after Rb's, relative to its last."""
    if len(Rb) == 1:
        # one image left: its input is the row, up to what the others' terms leave (noise). An image the model is
        # sure of has a gradient at 1e-5..1e-4 of the batch's, so that is up to 1e-2 of its own term (seed 0,
        # B = 16: two such images at cosine 1 - 1.5e-6 and 1 - 2e-8 to the truth, dipping to -2e-3 and -1.2e-4
        # of their largest feature, where 1e-4 was asked): where the row stands clear of it (10x), it may dip
        # that much below 0
        x = Rb / tb[:, None]
        tol = max(1e-4, noise) if noise < 0.1 else 1e-4
        keep = _nonnegative(x, tol) & x.isfinite().all(1) & ~same_direction(x, found).any(1)
        return x[keep]
    Ub, Sb, Vb = torch.linalg.svd(Rb, full_matrices=False)
    new, stall = Rb.new_zeros(0, Rb.shape[1]), 0
    while stall < patience and len(found) + len(new) < B:
        known = torch.cat([found, new])
        rest = (B * rate - _near_zero(known).sum(0)) / (B - len(known))  # the public rate, less the found zeros
        _, x = _input_candidates(Rb, tb, 8 * rest.clamp_min(1e-3).log(), chunk, generator)
        x = x[~same_direction(x, known).any(1)]
        zeros = _near_zero(x)
        zeros = zeros[zeros.sum(1).argsort(descending=True)[:refine]]
        ev, vec = torch.linalg.eigh(torch.einsum('bf,nf,cf->nbc', Vb, zeros.to(Vb), Vb))  # ascending
        sv = ev.clamp_min(0).sqrt()
        p = (vec[:, :, 0] / Sb) @ Ub.T
        x = p @ Rb / (p @ tb)[:, None]
        ok = (sv[:, 0] < 1e-4) & (sv[:, 1] > 0.03) & _nonnegative(x, 1e-4) & x.isfinite().all(1)
        before = len(new)
        for xi in x[ok]:
            if not same_direction(xi[None], torch.cat([known, new])).any():
                new = torch.cat([new, xi[None]])
        stall = stall + 1 if len(new) == before else 0
    return new


def gradient_of(x, L, model, generator, trials=20_000):
    """The gradient at fc1's output (out,) of the image whose fc1 input is x, if the batch gradient's column space
    (L, (out, B) orthonormal) pins it; else None. It vanishes on the units x leaves inactive: that leaves a space
    N of k directions (the images whose gradients also vanish there). Without dropout the image's gradient is the
    one in N that is W_fc2^T e on its active units (one solve); under dropout it also vanishes on the units
    dropped, and k-1 active units picked at random, all dropped (1 in 2^(k-1)), pin it. A candidate counts only if
    it is what the model gives: for some label y and dropout mask (the units it passes), exactly
    mask / keep * relu'(z) * W_fc2^T (p - onehot(y)), p the model's output for x under that mask."""
    W1, b1, W2, b2 = (w.detach().to(L) for w in (model.fc1.weight, model.fc1.bias, model.fc2.weight, model.fc2.bias))
    keep = 1 - model.dropout.p
    z = x.to(L) @ W1.T + b1
    active = z > 0
    ev, vec = torch.linalg.eigh(L[~active].T @ L[~active])
    N = L @ vec[:, ev.clamp_min(0).sqrt() < 1e-3]  # (out, k)
    k = N.shape[1]
    if not k:
        return None
    A = torch.cat([N[active], -W2.T[active]], 1)  # no unit dropped: N v = W_fc2^T e where active
    candidates = [N @ torch.linalg.eigh(A.T @ A)[1][:k, 0]]
    if k > 1:
        units = active.nonzero().flatten()
        picks = units[torch.rand(trials, len(units), generator=generator, dtype=L.dtype).argsort(1)[:, :k - 1]]
        M = N[picks]  # (trials, k-1, k)
        v = torch.linalg.eigh(M.transpose(1, 2) @ M)[1][:, :, 0]
        d = v @ N.T
        sparsest = _near_zero(d).sum(1).argsort(descending=True)
        candidates += list(d[sparsest[:8]])
    for d in candidates:
        for mask, scale in ((active, 1.0), (active & ~_near_zero(d), 1 / keep)):
            h = torch.relu(z) * mask * scale
            p = torch.softmax(W2 @ h + b2, 0)
            G = mask * scale * ((p - torch.eye(len(p), dtype=p.dtype)) @ W2)  # row y: for label y
            cos = (G @ d).abs() / (G.norm(dim=1) * d.norm())
            if cos.max() > 1 - 1e-6:
                return G[cos.argmax()]
    return None


def same_direction(a, b):
    """(len(a), len(b)) bool: whether rows of a and b are parallel (|cosine| above 1 - 1e-4)."""
    return (F.normalize(a, dim=1) @ F.normalize(b, dim=1).T).abs() > 1 - 1e-4


def _nonnegative(x, tol):
    """Whether each row of x is non-negative up to tol of its largest entry (the last dimension's rows)."""
    return x.amin(-1) >= -tol * x.abs().amax(-1)


def _near_zero(x):
    """Which entries of each row of x are zeros: at most 1e-4 of the row's largest."""
    return x.abs() <= 1e-4 * x.abs().amax(-1, keepdim=True)


def _with_left_out(Xt, D, ok, batch_size, dtype):
    """The separation's return for the images found (X^T (f, in), D (out, f), ok (f,)), padded to batch_size with
    the left-out images: zeros, ok False."""
    missing = batch_size - len(Xt)
    return (torch.cat([Xt, Xt.new_zeros(missing, Xt.shape[1])]).to(dtype),
            torch.cat([D.T * batch_size, D.new_zeros(missing, D.shape[0])]).to(dtype),
            torch.cat([ok, ok.new_zeros(missing)]))


def certified(d, output_weight, support=1e-3, tol=1e-2):
    """Whether d can be one image's gradient at fc1's output: on the units it passes, d = s * W_fc2^T e for one
    error e = p - onehot(y) (output_errors). A mixture of two images' columns is two such vectors on overlapping
    units and fails (residual 0.5-0.8 against < 3e-4 for true columns, tuning seeds 11-12)."""
    passes = d.abs() > support * d.abs().max()
    A = output_weight[:, passes].T
    e = torch.linalg.lstsq(A, d[passes, None]).solution
    return bool((A @ e - d[passes, None]).norm() <= tol * d[passes].norm())


def _null_vectors(L, units):
    """For each set of units (n, out) bool: whether U vanishes on them in exactly one direction (singular values
    of U there below 1e-4 of the largest for one, above 1e-3 for the rest), and that direction (n, B). From the
    Gram matrices' eigenvectors: a batched SVD of such matrices can fail to converge."""
    B = L.shape[1]
    gram = torch.einsum('ub,nu,uc->nbc', L, units.to(L.dtype), L)
    ev, vec = torch.linalg.eigh(gram)  # ascending
    sv = ev.clamp_min(0).sqrt()
    one = (units.sum(1) >= B - 1) & (sv[:, 0] < 1e-4 * sv[:, -1])
    if B > 1:
        one &= sv[:, 1] > 1e-3 * sv[:, -1]
    return one, vec[:, :, 0]


def _input_candidates(Rb, t, logw, chunk, generator, negative=1e-2):
    """Non-negative inputs c^T Rb, one per pick of k-1 features (k = Rb.shape[0]) drawn with log-weights logw:
    (c (n, k) scaled so that c^T t = 1, inputs (n, features))."""
    k = Rb.shape[0]
    if k == 1:
        c = Rb.new_ones(1, 1)
    else:
        gumbel = -torch.log(-torch.log(torch.rand(chunk, Rb.shape[1], generator=generator, dtype=Rb.dtype)))
        A = Rb.T[(logw[None] + gumbel).topk(k - 1, dim=1).indices]  # weighted picks without replacement
        sol, info = torch.linalg.solve_ex(A[..., :-1], -A[..., -1])
        c = torch.cat([sol, torch.ones_like(sol[:, :1])], 1)[info == 0]
    c = c / (c @ t)[:, None]
    x = c @ Rb
    keep = x.isfinite().all(1) & _nonnegative(x, negative)
    return c[keep], x[keep]


def _columns_by_votes(L, R_live, t, logw, W1_live, b1, W2, generator, chunk, patience, votes):
    """Columns found from input candidates: the null vector of U on each distinct set of units the candidates
    leave inactive (batched), counted each time it comes up, certified once it has `votes`; with, for each,
    where its sparsest candidate vanished. Stops once `patience` chunks add no column."""
    B = L.shape[1]
    pool, count, best, where, sure = [], [], [], [], []
    stall, chosen = 0, []
    while stall < patience and len(chosen) < B:
        _, x = _input_candidates(R_live, t, logw, chunk, generator)
        zeros = _near_zero(x).sum(1)
        sets, which = ((x @ W1_live.T + b1) <= 0).unique(dim=0, return_inverse=True)
        big = (sets.sum(1) >= B - 1).nonzero().flatten()
        one, qs = _null_vectors(L, sets[big])
        for q, s in zip(qs[one], big[one].tolist()):
            mine = (which == s).nonzero().flatten()
            rep, most = x[mine[zeros[mine].argmax()]], int(zeros[mine].max())
            same = [j for j, p in enumerate(pool) if (p @ q).abs() > 1 - 1e-6]
            if not same:
                pool.append(q), count.append(0), best.append(-1), where.append(None), sure.append(None)
                same = [len(pool) - 1]
            j = same[0]
            count[j] += 1
            if most > best[j]:
                best[j], where[j] = most, _near_zero(rep)
        for j in range(len(pool)):
            if count[j] >= votes and sure[j] is None:
                sure[j] = certified(L @ pool[j], W2)
        order = sorted((j for j in range(len(pool)) if sure[j]), key=lambda j: -count[j])
        before, chosen = chosen, [order[i] for i in _independent([pool[j] for j in order], B)]
        stall = stall + 1 if len(chosen) == len(before) else 0
    return [pool[j] for j in chosen], [where[j] for j in chosen]


def _sparsest_rows(Rb, t, logw, generator, chunk, patience):
    """The k (= Rb.shape[0]) independent rows c whose inputs c^T Rb vanish on the most features, refined on all
    the features they vanish on: in a space spanned by k images' inputs, those inputs (a mixture vanishes only
    where all its images do). Stops once the choice stays the same for two chunks."""
    k = Rb.shape[0]
    cs, zs, chosen, same = Rb.new_zeros(0, k), torch.zeros(0, dtype=torch.long), [], 0
    for _ in range(patience):
        c, x = _input_candidates(Rb, t, logw, chunk, generator)
        z = _near_zero(x).sum(1)
        top = z.argsort(descending=True)[:8 * k]
        cs, zs = torch.cat([cs, c[top]]), torch.cat([zs, z[top]])
        distinct = []
        for j in zs.argsort(descending=True).tolist():
            if not same_direction(cs[j:j + 1], cs[distinct]).any():
                distinct.append(j)
        cs, zs = cs[distinct], zs[distinct]
        before, chosen = chosen, _independent(list(cs), k)
        same = same + 1 if chosen == before and len(chosen) == k else 0
        if same >= 2:
            break
    rows = []
    for c in cs[chosen]:
        x = c @ Rb
        vh = torch.linalg.svd(Rb[:, _near_zero(x)].T, full_matrices=True)[2]
        c = vh[-1] / (vh[-1] @ t)
        if _nonnegative(c @ Rb, 1e-3):
            rows.append(c)
    return rows


def _inputs_and_gradients(Q, zeros, L, R, R_live, t, generator, picks=256):
    """Each found image's input X^T (f, in) and gradient D (out, f) from its column (Q's) and where its input
    vanishes (zeros). Its row p of P is orthogonal to the other columns found and p^T q = 1: with all B found
    that is p; else p = p0 + N a over the k missing images' rows, and k features where it vanished, picked at
    random, fix a -- the pick whose input vanishes on the most features is the image's (a pick of true zeros is
    exact)."""
    f = Q.shape[1]
    Xt, D = R.new_zeros(f, R.shape[1]), L.new_zeros(L.shape[0], f)
    for i in range(f):
        others = torch.cat([Q[:, :i], Q[:, i + 1:]], 1).T
        S = torch.linalg.svd(others, full_matrices=True)[2][f - 1:].T if f > 1 else torch.eye(len(t), dtype=t.dtype)
        g = S.T @ Q[:, i]
        p = S @ g / (g @ g)
        if S.shape[1] > 1:
            k = S.shape[1] - 1
            N = S @ torch.linalg.svd(g[None], full_matrices=True)[2][1:].T  # (B, k): p^T q stays 1
            x0, Nx = p @ R_live, N.T @ R_live
            cand = zeros[i].nonzero().flatten() if zeros[i].sum() >= k else torch.arange(len(x0))
            pick = cand[torch.rand(picks, len(cand), generator=generator).argsort(1)[:, :k]]
            a, info = torch.linalg.solve_ex(Nx.T[pick], -x0[pick])
            x = x0 + a @ Nx
            x = x * x.sum(1, keepdim=True).sign()  # q's sign is arbitrary
            vanish = (x.abs() <= 1e-5 * x.abs().amax(1, keepdim=True)).sum(1)
            vanish[(info != 0) | ~_nonnegative(x, 1e-3)] = -1
            p = p + N @ a[vanish.argmax()]
        p = p / (p @ t)
        Xt[i] = p @ R
        D[:, i] = L @ Q[:, i] / (p @ Q[:, i])
    return Xt, D


def _independent(vectors, n):
    """Indices of the first (up to) n of `vectors` that are independent of those before them (rtol 1e-3)."""
    chosen = []
    for j in range(len(vectors)):
        if torch.linalg.matrix_rank(torch.stack([vectors[i] for i in chosen + [j]]), rtol=1e-3) > len(chosen):
            chosen.append(j)
            if len(chosen) == n:
                break
    return chosen
