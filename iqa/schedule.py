"""Learning-rate schedules: per epoch (train_swin.py) and per optimizer step (train_clip.py)."""
import math


def learning_rates(epoch, args):
    """(backbone lr, head lr) for a 0-based epoch.

    Cosine decays each group to `min_lr_ratio` x its own start. The user's code
    used CosineAnnealingLR(eta_min=1e-6) for both groups, which *raises* the
    learning rate during training whenever it starts below 1e-6 (their best runs
    used lr=5e-7); a floor proportional to each group's lr cannot do that.
    """
    base_backbone, base_head = args.lr, args.lr * args.lr_ratio
    if epoch < args.warmup_epochs:
        f = (epoch + 1) / (args.warmup_epochs + 1)
        return base_backbone * f, base_head * f
    if args.lr_scheduler == 'cosine':
        span = max(args.epochs - args.warmup_epochs, 1)
        progress = (epoch - args.warmup_epochs) / span
        f = args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return base_backbone * f, base_head * f
    if args.lr_scheduler == 'step':
        # Original HyperIQA: the backbone keeps its lr, the hyper-network's drops 10x every 6 epochs.
        return base_backbone, base_head / 10 ** (epoch // 6)
    return base_backbone, base_head


def lr_factor(step, epoch, total_steps, args):
    """Multiplier of the starting learning rates before optimizer step `step` (0-based) in `epoch`.

    cosine / linear / constant follow transformers' get_*_schedule_with_warmup (the original's
    scheduler, stepped once per optimizer step): a linear warm-up over warmup_ratio of all steps
    (factor 0 at step 0), then a half cosine or a straight line to 0, or flat. step is StepLR:
    gamma ** (epoch // step_size), no warm-up."""
    if args.scheduler == 'step':
        return args.step_lr_gamma ** (epoch // args.step_lr_step_size)
    warmup = int(args.warmup_ratio * total_steps)
    if step < warmup:
        return step / max(1, warmup)
    if args.scheduler == 'constant':
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    if args.scheduler == 'linear':
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
