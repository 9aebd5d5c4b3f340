"""row_nearest_trial without the stratified weight of the random set (see row_nearest_trial.py)."""
from row_nearest_trial import install

install(corrected=False)
