"""Training losses of the Swin trainer between (B,) predictions and (B,) MOS (formulas: docs/training.md, Losses)."""
import math

import torch
import torch.nn.functional as F

LOSS_TYPES = ('l1', 'l2', 'srcc', 'rank', 'pairwise', 'hinge', 'fidelity')


def quality_loss(pred, mos, loss_type, margin=0.1):
    """The main training loss between (B,) predictions and (B,) MOS.

    `rank` and `pairwise` are the user's formulas (same name, same meaning, so old ablations
    re-run here compute what they computed); `hinge` and `fidelity` are this project's variants.
    """
    if loss_type == 'l1':
        return F.l1_loss(pred, mos)
    if loss_type == 'l2':
        return F.mse_loss(pred, mos)
    if loss_type == 'srcc':
        return 1.0 - batch_correlation(pred, mos)
    if loss_type == 'rank':
        return rank_loss(pred, mos)
    if loss_type == 'pairwise':
        return pairwise_fidelity_loss(pred, mos)
    if loss_type == 'hinge':
        return margin_ranking_loss(pred, mos, margin)
    if loss_type == 'fidelity':
        return fidelity_loss(pred, mos)
    raise ValueError(f'unknown loss_type {loss_type!r}')


def batch_correlation(pred, mos, eps=1e-8):
    """Pearson correlation over the batch: a differentiable stand-in for SRCC."""
    p = pred - pred.mean()
    m = mos - mos.mean()
    return (p * m).sum() / (p.norm() * m.norm() + eps)


def _pair_differences(pred, mos):
    """(dp, dy, mask) over all ordered pairs (i, j): mask marks those whose targets differ
    (|y_i - y_j| > 1e-6; the diagonal is never marked).

    The user's pairwise losses average over exactly the marked pairs; a pair and its mirror give
    the same term in both losses below, so ordered or unordered pairs give the same mean. The
    pairs stay a dense (B, B) grid with a mask, not gathered by boolean indexing: gathering needs
    the count of marked pairs on the host, a GPU->CPU wait in every training step.
    """
    dp = pred[:, None] - pred[None, :]
    dy = mos[:, None] - mos[None, :]
    return dp, dy, dy.abs() > 1e-6


def _masked_mean(values, mask):
    """Mean of `values` where `mask` holds; 0 (with zero gradients) where it holds nowhere.

    torch.where, not a product, so a non-finite value outside the mask stays out of the mean."""
    picked = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return picked.sum() / mask.sum().clamp(min=1).to(values.dtype)


def rank_loss(pred, mos):
    """The user's `--loss_type rank`: mean of max(0, |dp| - e * dy) over pairs with different MOS.

    dp = p_i - p_j, dy = y_i - y_j, e = sign(dp) (1 where dp = 0). A pair ordered like its MOS
    costs max(0, |dp| - |dy|): the predicted gap may not exceed the MOS gap; a pair ordered
    against it costs |dp| + |dy|. Unlike a margin hinge it is in MOS units. 0 when all MOS are equal.
    """
    dp, dy, mask = _pair_differences(pred, mos)
    e = torch.where(dp >= 0, 1.0, -1.0).to(dp.dtype)
    return _masked_mean(F.relu(dp.abs() - e * dy), mask)


def pairwise_fidelity_loss(pred, mos, sigma=0.1, eps=1e-8):
    """The user's `--loss_type pairwise`: fidelity loss with logistic pair probabilities.

    p_gt = sigmoid(dy), p_pred = sigmoid(1.702 dp / (sqrt(2) sigma)) (1.702 x makes the logistic
    a close approximation of the normal CDF, i.e. Thurstone with per-image std sigma = 0.1);
    loss = 1 - sqrt(p_gt p_pred + eps) - sqrt((1 - p_gt)(1 - p_pred) + eps), averaged over
    the pairs of `_pair_differences`. 0 pairs (all MOS equal) give 0.
    """
    dp, dy, mask = _pair_differences(pred, mos)
    p_gt = torch.sigmoid(dy)
    p_pred = torch.sigmoid(1.702 * dp / (math.sqrt(2) * sigma))
    loss = 1 - torch.sqrt(p_gt * p_pred + eps) - torch.sqrt((1 - p_gt) * (1 - p_pred) + eps)
    return _masked_mean(loss, mask)


def margin_ranking_loss(pred, mos, margin=0.1):
    """Mean hinge max(0, margin - (p_i - p_j) * sign(y_i - y_j)) over pairs with y_i != y_j.

    The user's ranking loss added by `--ranking_loss_alpha` (their solver's
    pairwise_ranking_loss), and `--loss_type hinge` on its own: it penalises every pair the
    model orders against the MOS (or separates by less than `margin`). 0 when all MOS are equal.
    """
    sign = torch.sign(mos[:, None] - mos[None, :])
    hinge = F.relu(margin - (pred[:, None] - pred[None, :]) * sign)
    return _masked_mean(hinge, sign != 0)


def fidelity_loss(pred, mos, eps=1e-12):
    """`--loss_type fidelity`: pairwise fidelity loss of Tsai et al. 2007 (UNIQUE/LIQE for IQA).

    This project's variant, not the user's `pairwise`: P(i better than j) = Phi((p_i - p_j) /
    sqrt(2)) under a Thurstone model with unit variance; the target is 1, 0.5 or 0 from the
    MOS order. Averaged over pairs i < j.
    """
    i, j = torch.triu_indices(len(pred), len(pred), offset=1, device=pred.device)
    prob = 0.5 * (1 + torch.erf((pred[i] - pred[j]) / 2))  # Phi(d / sqrt 2) = (1 + erf(d / 2)) / 2
    target = (torch.sign(mos[i] - mos[j]) + 1) / 2
    loss = 1 - torch.sqrt(target * prob + eps) - torch.sqrt((1 - target) * (1 - prob) + eps)
    return loss.mean()


def total_loss(pred, mos, args):
    loss = quality_loss(pred, mos, args.loss_type, args.ranking_loss_margin)
    if args.ranking_loss_alpha > 0:
        loss = loss + args.ranking_loss_alpha * margin_ranking_loss(pred, mos, args.ranking_loss_margin)
    return loss
