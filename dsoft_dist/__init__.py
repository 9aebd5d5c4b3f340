"""dsoft_dist: distributed dissected-softmax (D-Softmax) training for large-class embedding models.

    import dsoft_dist
    loss_fn = dsoft_dist.DSoftmaxLoss(num_classes=1000, embedding_size=512)
"""
from dsoft_dist.head import ShardedClassifier
from dsoft_dist.losses import DSoftmaxLoss, MarginSoftmaxLoss
from dsoft_dist.utils import __version__

__all__ = ["DSoftmaxLoss", "MarginSoftmaxLoss", "ShardedClassifier", "__version__"]
