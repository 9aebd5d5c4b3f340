"""dsoft_dist: distributed dissected-softmax training for large-class embedding models."""
