"""A multi-task fine-tuning mixture: two text-to-text tasks and span corruption, mixed by rate.

Command (each task's files by flag; any file, comma list, glob or folder of shards, .gz / .zst):
  python train.py --config configs/mixture.py --workdir workdir/mix \
    --config.data.tasks.translate.train_file='data/translate/train-*.tsv.gz' \
    --config.data.tasks.translate.eval_file=data/translate/dev.tsv \
    --config.data.tasks.qa.train_file='data/qa/*.jsonl.zst' \
    --config.data.tasks.qa.eval_file=data/qa/dev.jsonl \
    --config.data.tasks.lm.train_file=data/corpus/ \
    --config.data.tokenizer=path/to/spiece.model

Rates: translate and qa are examples-proportional (rate 0: their training records, at most
`mixture_cap`), lm samples at a fixed weight. Evaluation writes one metrics row per task with an
eval_file ("eval/translate", "eval/qa") and their mean ("eval"). See docs/data.md.
"""

from configs.base import get_config as base_config
from configs.base import model_section


def get_config():
  c = base_config()
  c.model = model_section("t5-v1_1-small", vocab_size=0, dropout_rate=0.1)
  c.data.max_input_length = 256
  c.data.max_target_length = 64
  c.data.pack = True
  c.data.mixture_cap = 100_000
  c.data.tasks = {
    "translate": dict(kind="tsv", train_file="", eval_file="", prefix="translate: ", rate=0.0),
    "qa": dict(kind="jsonl", train_file="", eval_file="", prefix="question: ", rate=0.0),
    "lm": dict(kind="span_corruption", train_file="", eval_file="", rate=50_000.0),
  }
  c.optimizer.learning_rate = 1e-3
  c.optimizer.schedule = "constant"
  c.optimizer.warmup_steps = 0
  c.batch_size = 32
  c.num_train_steps = 10_000
  c.eval_every = 1000
  c.checkpoint_every = 1000
  return c
