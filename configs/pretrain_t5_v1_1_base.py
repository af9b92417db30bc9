"""T5 1.1 base pretraining with span corruption, as in the T5 paper and t5x, on your own corpus.

From raw text to a first checkpoint (one document per line of `.txt` / `.txt.gz` / `.txt.zst`
files, or the `text` field of JSONL / Parquet records; any file, list, glob or folder):

  hf download google/t5-v1_1-base spiece.model --local-dir t5_tokenizer   # T5's 32k vocabulary
  python -m t5jax.prepare --input='corpus/*.txt.gz' --output=prepared/corpus --kind=text \\
      --tokenizer=t5_tokenizer/spiece.model --chunk_length=568
  python train.py --config configs/pretrain_t5_v1_1_base.py --workdir workdir/pretrain \\
      --config.data.train_file=prepared/corpus

The first checkpoint lands in workdir/pretrain/checkpoints/2000. Raw text trains too, tokenized on
the fly (`--config.data.train_file='corpus/*.txt.gz'
--config.data.tokenizer=t5_tokenizer/spiece.model --config.data.num_workers=8`); prepared shards
read token ids only (568-token chunks with --chunk_length=568, a batch at a time) and are
shuffled by a global permutation. A tokenizer is required: a prepared folder brings
its own, otherwise give `--config.data.tokenizer` (this config trains none: spm_vocab_size 0).
An evaluation set: `--config.data.eval_file=...` (raw or prepared; the loss and accuracy of
span-corrupted held-out chunks every eval_every steps).

Settings (t5x's t5_1_1/base.gin + configs/runs/pretrain.gin, and the T5 paper, sec. 3.1.2):
- model: T5 1.1 base (gated GELU, no dropout in pretraining, untied output layer, 32128
  embedding rows for the 32000 pieces + 100 sentinels), bfloat16 compute, float32 parameters.
- data: span corruption, noise density 0.15, mean span 3; inputs 512 / targets 114 tokens (raw
  chunks of 568 tokens), packed; batch 128 rows (2^16 tokens per step).
- optimizer: Adafactor (decay rate 0.8, factored second moments, no momentum, update clipping 1.0,
  parameter-scaled steps), learning rate 1.0 * rsqrt(max(step, 10000)) (0.01 for the first 10k
  steps); loss with z-loss 1e-4, no label smoothing.
- steps: 2^19 = 524,288 (the paper's pretraining length, ~34B tokens); t5x's example
  (base_c4_pretrain.gin) runs 100k steps at batch 256.

Cost (an estimate): a step is ~6 x (85M encoder weights x 512 + 138M decoder weights, output
layer included, x 114) x 128 ~= 4.5e13 FLOPs, ~0.12 s on one H100 at 40% of its bf16 peak, so
the input pipeline must deliver ~1,000 examples/s (benchmarks/data.py measures what a CPU core
gives) and 2^19 steps take ~18 h. Smaller first runs: `--config.num_train_steps=20000`. Over
several devices, `--config.mesh.fsdp=N` shards the state; the batch is global.
"""

from configs.base import get_config as base_config
from configs.base import model_section


def get_config():
  c = base_config()
  c.model = model_section(
    "t5-v1_1-base",
    dropout_rate=0.0,  # T5 1.1 pretrains without dropout (re-enable it to finetune)
    dtype="bfloat16",
  )
  c.data.kind = "span_corruption"
  c.data.train_file = ""  # required: --config.data.train_file=prepared/corpus (or raw files)
  c.data.tokenizer = ""  # a prepared folder's, or --config.data.tokenizer=spiece.model
  c.data.spm_vocab_size = 0  # never train a tokenizer for this config
  c.data.noise_density = 0.15
  c.data.mean_noise_span_length = 3.0
  c.data.max_input_length = 512
  c.data.max_target_length = 114
  c.data.pack = True
  c.data.max_eval_examples = 2048  # held-out chunks scored per evaluation, when eval_file is set
  c.optimizer.name = "adafactor"
  c.optimizer.learning_rate = 1.0
  c.optimizer.schedule = "rsqrt"
  c.optimizer.warmup_steps = 10_000
  c.optimizer.adafactor.decay_rate = 0.8
  c.optimizer.adafactor.momentum = 0.0
  c.optimizer.adafactor.clipping_threshold = 1.0
  c.optimizer.adafactor.multiply_by_parameter_scale = True
  c.optimizer.adafactor.factored = True
  c.loss.z_loss = 1e-4
  c.loss.label_smoothing = 0.0
  c.batch_size = 128
  c.num_train_steps = 2**19
  c.log_every = 100
  c.eval_every = 2000
  c.checkpoint_every = 2000
  c.keep_checkpoints = 3
  c.eval_generate_examples = 0  # span-corrupted chunks: loss and accuracy, no generation
  return c
