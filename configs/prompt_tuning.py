"""Prompt tuning of a HuggingFace T5 folder on a TSV of input<TAB>target lines.

Command:
  python train.py --config configs/prompt_tuning.py --workdir workdir/prompt \\
    --config.init_from=PATH/TO/HF_T5 --config.data.tokenizer=PATH/TO/HF_T5 \\
    --config.data.train_file=train.tsv --config.data.eval_file=dev.tsv
Then:
  python decode.py --checkpoint workdir/prompt --input_file inputs.txt

The model stays frozen; 100 soft-prompt vectors, initialised from vocabulary embeddings, are
prepended to every encoder input and trained alone (Adafactor at 0.3, as the prompt tuning paper
trains them). Checkpoints hold the prompt and its optimizer state only, next to `peft.json`
naming the base; transformers has no form for a soft prompt, so decode with t5jax (decode.py).
See docs/peft.md.
"""

from configs.base import get_config as base_config


def get_config():
  c = base_config()
  c.model = {}  # the architecture is init_from's
  c.prompt.length = 100
  c.prompt.init = "vocab"
  c.data.kind = "tsv"
  c.data.max_input_length = 512
  c.data.max_target_length = 128
  c.optimizer.name = "adafactor"
  c.optimizer.learning_rate = 0.3
  c.optimizer.schedule = "constant"
  c.optimizer.warmup_steps = 0
  c.optimizer.weight_decay = 1e-5
  c.optimizer.adafactor.multiply_by_parameter_scale = False
  c.batch_size = 8
  c.num_train_steps = 1000
  c.log_every = 50
  c.eval_every = 250
  c.checkpoint_every = 250
  c.eval_generate_examples = 64
  return c
