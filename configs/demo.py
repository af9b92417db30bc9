"""The embedded default: a small T5 learns built-in text-to-text tasks on a CPU.

Command:  python train.py --config configs/demo.py --workdir workdir/demo
Then:     printf 'add: 17 + 25\n' | python decode.py --checkpoint workdir/demo
Runtime:  about N minutes on a 2-core CPU (see README).
Expected: eval exact_match >= 0.95 on the held-out split (add, reverse, sort, number to words).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from base import get_config as base_config  # noqa: E402
from base import model_section


def get_config():
  c = base_config()
  c.model = model_section(
    "t5-v1_1-small",
    vocab_size=0,  # the trained tokenizer's size, rounded up to 128
    d_model=128,
    d_kv=32,
    d_ff=256,
    num_heads=4,
    num_layers=2,
    num_decoder_layers=2,
    dropout_rate=0.0,
  )
  c.data.kind = "builtin"
  c.data.spm_vocab_size = 400
  c.data.max_input_length = 24
  c.data.max_target_length = 12
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 3e-3
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 200
  c.optimizer.total_steps = 3000
  c.optimizer.end_learning_rate = 1e-5
  c.optimizer.grad_clip_norm = 1.0
  c.batch_size = 64
  c.num_train_steps = 3000
  c.log_every = 100
  c.eval_every = 1000
  c.checkpoint_every = 1000
  c.eval_generate_examples = 200
  c.best_metric = "exact_match"
  return c
