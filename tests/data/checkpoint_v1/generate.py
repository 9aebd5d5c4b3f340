"""Writes a run folder of checkpoint format dsoft_dist.run_checkpoint/1 (dsoft_dist at f4a3eb6): the run of
tests/test_checkpoint.py's ckpt_cfg on 2 gloo ranks, stopped after step 5 with its checkpoint."""
import shutil, sys
sys.path.insert(0, "/tmp/wt-old")
from tests.test_checkpoint import ckpt_cfg
from tests.test_train_dist import run_jobs
if __name__ == "__main__":
  out = sys.argv[1]
  shutil.rmtree(out, ignore_errors=True)
  run_jobs([(ckpt_cfg(out, checkpoint__keep_last=1), 5)])
