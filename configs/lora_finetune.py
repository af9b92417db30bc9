"""LoRA fine-tuning of a HuggingFace T5 folder on a TSV of input<TAB>target lines.

Command:
  python train.py --config configs/lora_finetune.py --workdir workdir/lora \\
    --config.init_from=PATH/TO/HF_T5 --config.data.tokenizer=PATH/TO/HF_T5 \\
    --config.data.train_file=train.tsv --config.data.eval_file=dev.tsv
Then:
  python decode.py --checkpoint workdir/lora --input_file inputs.txt

The model stays frozen; rank-8 adapters on the query and value projections of every attention
(encoder, decoder, cross: PEFT's default for T5) are trained, with AdamW at 1e-3 (LoRA's usual
rate, far above full fine-tuning's). Checkpoints hold the adapters and their optimizer state
only, next to `peft.json` naming the base folder; at the end `export/hf/` holds the merged model
(transformers loads it) and `export/peft/` the adapters in PEFT's format. See docs/peft.md.
Runtime and quality depend on the model and data; docs/peft.md has measured numbers.
"""

from configs.base import get_config as base_config


def get_config():
  c = base_config()
  c.model = {}  # the architecture is init_from's
  c.lora.rank = 8
  c.lora.alpha = 16.0
  c.lora.dropout = 0.05
  c.lora.encoder = "q,v"
  c.lora.decoder = "q,v"
  c.lora.cross = "q,v"
  c.data.kind = "tsv"
  c.data.max_input_length = 512
  c.data.max_target_length = 128
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.schedule = "constant"
  c.optimizer.warmup_steps = 0
  c.loss.z_loss = 0.0
  c.batch_size = 8
  c.num_train_steps = 1000
  c.log_every = 50
  c.eval_every = 250
  c.checkpoint_every = 250
  c.eval_generate_examples = 64
  return c
