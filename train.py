"""Train a T5: `python train.py --config configs/demo.py --workdir DIR [--config.x=y ...]`.

Starts from scratch, from a HuggingFace folder (`--config.init_from=PATH`), or resumes what DIR
holds. SIGTERM / SIGINT save a checkpoint and exit 0. Errors are one line with a non-zero exit.
Every --config field: t5jax/train_config.py.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.")
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics, tokenizer and config go.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from t5jax import distributed
  from t5jax.train import train_and_evaluate

  logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO

  distributed.maybe_initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  train_and_evaluate(FLAGS.config, FLAGS.workdir)
  distributed.shutdown()  # several processes leave together (process 0 hosts the coordinator)


def _error(message: str, status: int) -> None:
  print(f"train.py: error: {' '.join(str(message).split())}", file=sys.stderr)
  sys.exit(status)


DOCS = "Every option group, resume and what survives what: docs/training.md"


def _parse_flags(argv):
  """absl's parsing, with a one-line error (not a traceback or usage dump) for a bad flag."""
  try:
    rest = FLAGS(argv)
    FLAGS.config.keys()  # config_flags defers a config file's load error to the first access
    return rest
  except SystemExit:  # --help / --helpfull printed the flags and exits: end with the docs
    if not any(a.startswith("--helpxml") for a in argv):
      print(DOCS)
    raise
  except Exception as e:  # noqa: BLE001 - a bad --config file or override raises anything
    # A misspelt override arrives as AttributeError(KeyError("'key'\nDid you mean ...")).
    while isinstance(e, KeyError | AttributeError) and e.args and isinstance(e.args[0], Exception):
      e = e.args[0]
    if isinstance(e, KeyError | AttributeError) and e.args:
      e = f"unknown config field {e.args[0]}"
    _error(e, 2)


def run():
  from t5jax.errors import USER_ERRORS

  try:
    app.run(main, flags_parser=_parse_flags)
  except USER_ERRORS as e:  # anything else is a bug: its traceback is kept
    _error(e, 1)


if __name__ == "__main__":
  run()
