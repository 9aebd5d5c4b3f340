"""A trial outside the package (sampled-k-seeds.md): D-Softmax-K whose K sampled classes are, for half of them, the
classes nearest to the step's rows, and random for the rest. It asks whether D-Softmax-K trails full D-Softmax on
glyphs because the random set misses each row's nearest classes, with K held where it is. It is an oracle: it finds
the nearest classes from every class's cosine with every row, the full-class product that sampling is there to
avoid, so it says what a cheap way of finding them (kept from earlier steps) would be worth, not what one costs:

    PYTHONPATH=docs/benchmarks/parity-2026-12-07 dsoft bench accuracy --parts glyphs --glyph-steps 2400 --seeds 0 \
      --methods d_softmax_k --rates 1/8 --sweep "extra_modules=[nearest_trial]" --sweep optimizer.lr=0.02 \
      --out runs/nearest

A class's nearness is its largest cosine with a row of the step that is not of that class. The step's K
(ceil(r C) per shard) is kept: the NEAREST_SHARE K nearest classes, then random others drawn as D-Softmax-K draws
them. Only training steps change; the loss of a step is D-Softmax over that set, as for D-Softmax-K.
"""
import torch
import torch.nn.functional as F

from dsoft_dist.head.sharded import ShardedClassifier
from dsoft_dist.losses.negatives import draw_seed, sample_without_replacement
from dsoft_dist.observability import get_logger

NEAREST_SHARE = 0.5
log = get_logger(__name__)
_local_stats = ShardedClassifier._local_stats_for


@torch.no_grad()
def nearest_rows(head, feats, rows, target_local):
    """Sorted local ids: the shard's NEAREST_SHARE x K classes nearest the rows, then random others up to K."""
    k = rows.numel()
    n_near = round(NEAREST_SHARE * k)
    cos = feats.float() @ F.normalize(head.weight.detach().float(), dim=1).T  # (B, C_local)
    owned = (target_local >= 0).nonzero().squeeze(1)
    cos[owned, target_local[owned]] = float("-inf")  # a row's own class is not its negative
    near = cos.max(dim=0).values.topk(n_near).indices.sort().values.cpu()
    rest = sample_without_replacement(head.num_local_classes, k - n_near, draw_seed(head.seed, head.draws, head.rank),
                                      exclude=near)
    return torch.cat([near, rest]).sort().values.to(rows.device)


def local_stats_with_nearest(head, feats, rows, target_local, valid):
    if head.training and rows is not None:
        if not getattr(head, "_nearest_logged", False):
            log.info("nearest trial: %.2f of the %d sampled classes of shard %d are the nearest to the step's rows",
                     NEAREST_SHARE, rows.numel(), head.rank)
            head._nearest_logged = True
        rows = nearest_rows(head, feats, rows, target_local)
    return _local_stats(head, feats, rows, target_local, valid)


ShardedClassifier._local_stats_for = local_stats_with_nearest
