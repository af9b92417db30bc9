"""Decoding throughput: t5jax.generate next to transformers generate(), same weights, same run.

  python -m benchmarks.decode                      # CPU: t5-v1_1-small, batch 8, 64 in, 32 out
  python -m benchmarks.decode --load 1             # the same with a CPU-bound busy loop running
  python -m benchmarks.decode --preset t5-v1_1-base --batch 64 --input_len 512 \\
      --new_tokens 128 --dtype bfloat16            # accelerator setting
  python -m benchmarks.decode --scan_layers 1      # layers under one scan (T5Config.scan_layers)

Random weights (t5jax.init_params) written once with t5jax.save_hf and loaded by both sides
(t5jax.load_hf; transformers from_pretrained), so both decode the same model. Every row
generates exactly --new_tokens tokens: t5jax with `ignore_eos=True`, transformers with
`min_new_tokens` (EOS suppressed until then).

Every measurement is a fresh Python process (`--repeats` processes per variant, interleaved; the
best kept): t5jax per XLA variant (`--xla`: `default`, `eigen1` = XLA_FLAGS
--xla_cpu_multi_thread_eigen=false), transformers at each of `--threads` (default 1 and 2) under
the default OpenMP wait policy (OMP_WAIT_POLICY unset), the better thread count being the
reference for the ratio. Inside a process each method runs once to warm up (t5jax: compile time =
first call minus the best warm call), then --calls timed calls, the fastest kept. tokens/s =
batch * new_tokens / time (returned tokens, beams not counted). `--load N` keeps N
`python -c 'while 1: pass'` processes running during every measurement. `--no_hf` skips
transformers.

`--matmul 1` (the default) also times the decode's dense matmuls alone, in XLA and in torch (at
each of `--threads`), each in a fresh process: per method, the encoder's projections and MLPs over
`batch * input_len` rows and the cross-attention keys/values, then `new_tokens` steps of every
decoder layer's projections and MLP plus the output layer over the decoding rows (batch, or
batch * beams), each matrix a distinct array as in the model, so every step streams all the
decoder's weights from memory, each side holding its weights as its model does (t5jax `[K, N]`,
x @ W; transformers' nn.Linear `[N, K]`, x @ Wᵀ). Attention products, norms, softmax and search
are left out. The
best transformers time over XLA's matmul-only time is the highest t5jax/transformers ratio
reachable if everything but t5jax's matmuls took no time: the ceiling the decode target is held to.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from benchmarks import _harness as H
from t5jax.config import ATTENTION_IMPLS


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="t5-v1_1-small")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--input_len", type=int, default=64)
  p.add_argument("--new_tokens", type=int, default=32)
  p.add_argument("--num_beams", type=int, default=4)
  p.add_argument("--methods", default="greedy,beam", help="comma-separated: greedy, beam, sample")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--scan_layers", type=int, default=0, choices=(0, 1), help="T5Config.scan_layers")
  p.add_argument(
    "--attention_impl", default="einsum", choices=ATTENTION_IMPLS, help="T5Config.attention_impl"
  )
  p.add_argument("--calls", type=int, default=3, help="timed calls per method per process")
  p.add_argument("--repeats", type=int, default=2, help="fresh processes per variant (best kept)")
  p.add_argument("--matmul", type=int, default=1, choices=(0, 1), help="time the matmuls alone")
  p.add_argument(
    "--quantize",
    default="none",
    help="comma-separated t5jax weight precisions: none (--dtype), int8, bf16 (t5jax.quantize)",
  )
  p.add_argument(
    "--peer",
    default="",
    choices=("", "ctranslate2"),
    help="also decode with CTranslate2 (converted from the same folder) at each precision",
  )
  H.add_common_args(p, ("t5jax", "torch", "mm_xla", "mm_torch", "ct2"))
  return p.parse_args(argv)


def make_tokens(config, args):
  import numpy as np

  rng = np.random.default_rng(args.seed)
  tokens = rng.integers(3, config.vocab_size - 200, size=(args.batch, args.input_len))
  tokens[:, -1] = config.eos_token_id
  return tokens.astype(np.int32)


def _best(fn, calls):
  best, out = float("inf"), None
  for _ in range(calls):
    t = time.perf_counter()
    out = fn()
    best = min(best, time.perf_counter() - t)
  return best, out


def worker_t5jax(args) -> dict:
  import jax
  import numpy as np

  import t5jax
  from t5jax.generate import generate

  config, params = t5jax.load_hf(args._ckpt, scan_layers=bool(args.scan_layers))
  config = config.replace(dtype=args.dtype, dropout_rate=0.0, attention_impl=args.attention_impl)
  params = jax.device_put(params)
  precision = os.environ.get(_PRECISION_VAR, "none")
  if precision == "int8":
    params = t5jax.quantize(params, config, "int8")
  elif precision == "bf16":
    config = config.replace(dtype="bfloat16")
    params = t5jax.quantize(params, config, "bfloat16")
  tokens = make_tokens(config, args)
  res = {}
  for method in args.methods.split(","):
    kw = dict(method=method, max_new_tokens=args.new_tokens, ignore_eos=True)
    if method == "beam":
      kw["num_beams"] = args.num_beams

    def run(kw=kw):
      return jax.block_until_ready(generate(params, config, tokens, **kw).sequences)

    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    best, out = _best(run, args.calls)
    seqs = np.asarray(out).reshape(args.batch, -1)[:, : args.new_tokens]
    res[method] = dict(time=best, compile_s=first - best, seqs=seqs.tolist())
  return dict(methods=res, versions=f"jax {jax.__version__}")


# Which precision a t5jax, matmul or CTranslate2 worker runs at: set in its job's environment.
_PRECISION_VAR = "T5JAX_BENCH_PRECISION"
# t5jax precision -> CTranslate2 compute type (its CPU build here has no bfloat16).
CT2_COMPUTE = {"none": "float32", "int8": "int8"}


class _IdVocabulary:
  """What CTranslate2's T5 converter reads from a tokenizer, for a folder without one: token i
  is spelled `<i>`, so both sides decode the same ids."""

  def __init__(self, config):
    self._vocab = {f"<{i}>": i for i in range(config.vocab_size)}
    self.pad_token = f"<{config.pad_token_id}>"
    self.eos_token = f"<{config.eos_token_id}>"
    self.unk_token = "<2>"

  def get_vocab(self):
    return dict(self._vocab)

  def convert_ids_to_tokens(self, i):
    return f"<{i}>"


def convert_ct2(hf_folder: str, out: str, compute_type: str) -> None:
  """The exported HF folder converted with CTranslate2's converter (`quantization=compute_type`)."""
  from ctranslate2.converters import TransformersConverter

  import t5jax

  config = t5jax.load_hf(hf_folder)[0]

  class Converter(TransformersConverter):
    def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
      return _IdVocabulary(config)

  Converter(hf_folder).convert(out, quantization=compute_type, force=True)


def ct2_folder(ckpt: str, compute_type: str) -> str:
  return f"{ckpt}-ct2-{compute_type}"


def worker_ct2(args) -> dict:
  import ctranslate2

  import t5jax

  config = t5jax.load_hf(args._ckpt)[0]
  compute = CT2_COMPUTE[os.environ.get(_PRECISION_VAR, "none")]
  translator = ctranslate2.Translator(
    ct2_folder(args._ckpt, compute), device="cpu", compute_type=compute,
    intra_threads=args._nthreads, inter_threads=1,
  )  # fmt: skip
  source = [[f"<{t}>" for t in row] for row in make_tokens(config, args).tolist()]
  res = {}
  for method in args.methods.split(","):
    beams = args.num_beams if method == "beam" else 1
    kw = dict(
      beam_size=beams, max_decoding_length=args.new_tokens, min_decoding_length=args.new_tokens,
      max_batch_size=0, return_scores=False,
    )  # fmt: skip
    if method == "sample":
      kw.update(sampling_topk=0, beam_size=1)

    def run(kw=kw):
      return translator.translate_batch(source, **kw)

    run()
    best, out = _best(run, args.calls)
    seqs = [[int(t[1:-1]) for t in r.hypotheses[0]] for r in out]
    res[method] = dict(time=best, compile_s=None, seqs=seqs)
  return dict(
    methods=res,
    versions=f"ctranslate2 {ctranslate2.__version__} {compute}, {args._nthreads} threads",
  )


def worker_torch(args) -> dict:
  import torch
  import transformers

  import t5jax

  torch.set_num_threads(args._nthreads)
  config = t5jax.load_hf(args._ckpt)[0]
  dt = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
  model = transformers.T5ForConditionalGeneration.from_pretrained(args._ckpt, dtype=dt).eval()
  model.generation_config.decoder_start_token_id = config.decoder_start_token_id
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model.to(device)
  ids = torch.tensor(make_tokens(config, args), dtype=torch.long, device=device)
  res = {}
  for method in args.methods.split(","):
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    kw.update(num_beams=args.num_beams if method == "beam" else 1, do_sample=method == "sample")
    if method == "sample":  # t5jax samples from the whole distribution; transformers: top-50
      kw.update(top_k=0, top_p=1.0)

    def run(kw=kw):
      with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=ids != 0, **kw)
      if device == "cuda":
        torch.cuda.synchronize()
      return out

    run()  # warm-up
    best, out = _best(run, args.calls)
    res[method] = dict(time=best, compile_s=None, seqs=out[:, 1:].cpu().numpy().tolist())
  return dict(
    methods=res,
    versions=f"transformers {transformers.__version__}, torch {torch.__version__} on {device},"
    f" {torch.get_num_threads()} threads",
  )


def decode_rows(method: str, args) -> int:
  return args.batch * (args.num_beams if method == "beam" else 1)


def matmul_weights(config, rng, dtype, out_first: bool = False):
  """Random matrices shaped as the model's, one array per use: ("enc" | "cross" | "dec", layer
  list of {name: [K, N]}), and the output layer. `out_first` stores each as `[N, K]` instead,
  as torch's Linear does (its product is then `F.linear(x, w)` = x @ wᵀ)."""
  d, a, f, v = config.d_model, config.num_heads * config.d_kv, config.d_ff, config.vocab_size
  mlp = {"wi_0": (d, f), "wi_1": (d, f)} if config.is_gated else {"wi": (d, f)}
  mlp["wo"] = (f, d)
  attn = {"q": (d, a), "k": (d, a), "v": (d, a), "o": (a, d)}
  shapes = {
    "enc": [dict(attn, **mlp) for _ in range(config.num_layers)],
    "cross": [{"k": (d, a), "v": (d, a)} for _ in range(config.num_decoder_layers)],
    "dec": [dict(attn, cq=(d, a), co=(a, d), **mlp) for _ in range(config.num_decoder_layers)],
  }

  def draw(shape):
    w = rng.standard_normal(shape, dtype="float32") * shape[0] ** -0.5
    return dtype(w.T.copy() if out_first else w)

  ws = {k: [{n: draw(sh) for n, sh in layer.items()} for layer in ls] for k, ls in shapes.items()}
  return ws, draw((d, v))


def matmul_passes(x, y, ws, lm_head, steps, mm, rowmax, loop):
  """The decode's matmuls with their data dependencies: the encoder over `x` [B*S, D] and the
  cross keys/values, then `steps` decoder steps over `y` [N, D] (`loop(step_fn, y, steps)`), with
  additions standing in for everything else. `mm` multiplies, `rowmax` is a max over the last
  axis (keeping it), so that each step reads every logit."""

  def attn_mlp(h, w, extra=None):
    h = h + mm(mm(h, w["q"]) + mm(h, w["k"]) + mm(h, w["v"]), w["o"])
    if extra:
      h = h + mm(mm(h, w["cq"]), w["co"])
    inner = mm(h, w["wi_0"]) * mm(h, w["wi_1"]) if "wi_0" in w else mm(h, w["wi"])
    return h + mm(inner, w["wo"])

  for w in ws["enc"]:
    x = attn_mlp(x, w)
  cross = sum(mm(x, w["k"]) + mm(x, w["v"]) for w in ws["cross"])

  def step(y):
    for w in ws["dec"]:
      y = attn_mlp(y, w, extra=True)
    logits = mm(y, lm_head)
    return y + rowmax(logits) * 1e-9  # the next step depends on the logits

  return loop(step, y, steps), cross


def worker_mm(args) -> dict:
  """Seconds of `matmul_passes` per method, best of --calls (after one warm-up call)."""
  import numpy as np

  import t5jax

  config = t5jax.load_hf(args._ckpt)[0]
  rng = np.random.default_rng(args.seed)
  res = {}
  if args._worker == "mm_xla":
    import jax
    import jax.numpy as jnp

    from t5jax.layers import dense
    from t5jax.quantize import QuantizedWeight, int8_matmul

    precision = os.environ.get(_PRECISION_VAR, "none")
    dt = jnp.bfloat16 if args.dtype == "bfloat16" or precision == "bf16" else jnp.float32
    mm = dense  # the model's product (on CPU, bf16 operands sum into float32)
    if precision == "int8":  # int8 weights and per-row int8 activations, as t5jax.quantize
      dt = jnp.float32

      def store(a):
        return QuantizedWeight(jnp.asarray(a * 20, jnp.int8), jnp.full((1, a.shape[1]), 0.05))

      ws, lm = matmul_weights(config, rng, store)
      mm = lambda x, w: int8_matmul(x, w, jnp.float32)
    else:
      ws, lm = matmul_weights(config, rng, lambda a: jnp.asarray(a, dt))

    def loop(step, y, n):
      return jax.lax.fori_loop(0, n, lambda i, y: step(y), y)

    for method in args.methods.split(","):
      n = decode_rows(method, args)
      x = jnp.ones((args.batch * args.input_len, config.d_model), dt)
      y = jnp.ones((n, config.d_model), dt)
      f = jax.jit(
        lambda x, y, ws, lm: matmul_passes(
          x, y, ws, lm, args.new_tokens, mm, lambda a: a.max(-1, keepdims=True), loop
        )
      )

      def run(f=f, x=x, y=y):
        return jax.block_until_ready(f(x, y, ws, lm))

      run()
      res[method] = _best(run, args.calls)[0]
    version = f"jax {jax.__version__}, {precision}"
  else:
    import torch

    torch.set_num_threads(args._nthreads)
    dt = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    # Weights as transformers holds them ([N, K], nn.Linear) and multiplied as it does: its
    # output layer alone at 8 rows took 3.4 ms this way against 2.0 ms as x @ [K, N] (2-core
    # VM, 2 threads, weights hot in cache; within the streaming decode the totals barely moved).
    ws, lm = matmul_weights(config, rng, lambda a: torch.from_numpy(a).to(dt), out_first=True)

    def loop(step, y, n):
      for _ in range(n):
        y = step(y)
      return y

    for method in args.methods.split(","):
      n = decode_rows(method, args)
      x = torch.ones((args.batch * args.input_len, config.d_model), dtype=dt)
      y = torch.ones((n, config.d_model), dtype=dt)

      def run(x=x, y=y):
        with torch.inference_mode():
          return matmul_passes(
            x,
            y,
            ws,
            lm,
            args.new_tokens,
            torch.nn.functional.linear,
            lambda a: a.amax(-1, keepdim=True),
            loop,
          )

      run()
      res[method] = _best(run, args.calls)[0]
    version = f"torch {torch.__version__}, {torch.get_num_threads()} threads"
  return dict(methods=res, versions=version)


def main():
  args = parse_args()
  if args._worker:
    fns = dict(
      t5jax=worker_t5jax, torch=worker_torch, mm_xla=worker_mm, mm_torch=worker_mm, ct2=worker_ct2
    )
    H.write_result(args._out, fns[args._worker](args))
    return
  H.require_reference("benchmarks.decode", args.no_hf)

  import jax

  import t5jax

  config = t5jax.get_config(args.preset, dropout_rate=0.0, dtype=args.dtype)
  if args.tiny:
    config = config.replace(
      d_model=64, d_kv=16, d_ff=128, num_heads=4, num_layers=2, num_decoder_layers=2
    )
  params = jax.device_get(t5jax.init_params(config, jax.random.key(args.seed)))
  threads = [int(x) for x in args.threads.split(",") if x]
  variants = [x for x in args.xla.split(",") if x]
  for v in variants:
    H.xla_variant_env(v)
  methods = args.methods.split(",")
  n_tok = args.batch * args.new_tokens
  print(f"machine: {H.machine_state()}; busy-loop load processes: {args.load}")
  print(
    f"model: {args.preset}{' (tiny)' if args.tiny else ''}, dtype {args.dtype}, scan_layers"
    f" {args.scan_layers}, attention {args.attention_impl}; batch {args.batch},"
    f" input {args.input_len} tokens, {args.new_tokens} new tokens forced, beams {args.num_beams};"
    f" {args.calls} timed calls per method per process, {args.repeats} processes per variant",
    flush=True,
  )
  module = __spec__.name  # benchmarks.decode, also when run as __main__
  passthrough = [
    f"--batch={args.batch}", f"--input_len={args.input_len}", f"--new_tokens={args.new_tokens}",
    f"--num_beams={args.num_beams}", f"--methods={args.methods}", f"--dtype={args.dtype}",
    f"--calls={args.calls}", f"--seed={args.seed}", f"--scan_layers={args.scan_layers}",
    f"--attention_impl={args.attention_impl}",
  ]  # fmt: skip
  if args.peer:
    H.require_module("benchmarks.decode --peer ctranslate2", "ctranslate2")
  precisions = [x for x in args.quantize.split(",") if x]
  if not precisions or any(x not in ("none", "int8", "bf16") for x in precisions):
    sys.exit(f"benchmarks.decode: error: --quantize: none, int8, bf16; got {args.quantize!r}")
  with tempfile.TemporaryDirectory() as tmp:
    ckpt = os.path.join(tmp, "model")
    t5jax.save_hf(config, params, ckpt)
    jobs = []
    for q in precisions:
      tag = "" if q == "none" else f" {q}"
      env = {_PRECISION_VAR: q}
      jobs += [(f"t5jax{tag} xla={v}", "t5jax", {**H.xla_variant_env(v), **env}) for v in variants]
    if not args.no_hf:
      jobs += [(f"torch {n} thr", "torch", H.thread_env(n)) for n in threads]
    if args.peer == "ctranslate2":
      for q in precisions:
        if q not in CT2_COMPUTE or args.dtype != "float32":
          print(f"ctranslate2: no {q if q != 'none' else args.dtype} on this CPU build; skipped")
          continue
        convert_ct2(ckpt, ct2_folder(ckpt, CT2_COMPUTE[q]), CT2_COMPUTE[q])
        jobs += [
          (f"ct2 {CT2_COMPUTE[q]} {n} thr", "ct2", {**H.thread_env(n), _PRECISION_VAR: q})
          for n in threads
        ]
    if args.matmul:
      for q in precisions:
        tag = "" if q == "none" else f" {q}"
        jobs += [
          (f"matmuls xla{tag}", "mm_xla", {**H.xla_variant_env("default"), _PRECISION_VAR: q})
        ]
      if not args.no_hf:
        jobs += [(f"matmuls torch {n} thr", "mm_torch", H.thread_env(n)) for n in threads]
    results = H.run_jobs(
      module, passthrough, jobs, ckpt, args,
      lambda r: ", ".join(f"{m} {_seconds(r['methods'][m]):.3f} s" for m in methods),
    )  # fmt: skip
  mm = {n: results.pop(n) for n in list(results) if n.startswith("matmuls")}

  print()
  print(f"{'method':8} {'impl':18} {'compile s':>9} {'time s':>8} {'tokens/s':>10}  versions")
  for method in methods:
    best = {
      name: min((r["methods"][method] for r in rs), key=lambda x: x["time"])
      for name, rs in results.items()
      if rs
    }
    for name, r in best.items():
      comp = f"{r['compile_s']:9.2f}" if r["compile_s"] is not None else f"{'-':>9}"
      print(
        f"{method:8} {name:18} {comp} {r['time']:8.3f} {n_tok / r['time']:10.1f}"
        f"  {results[name][0]['versions']}"
      )
    for q in precisions:
      _print_ratios(method, q, best, args)
  if mm:
    _print_matmul_floor(mm, results, methods)
  print(f"machine after: {H.machine_state()}")


def _same_rows(a, b) -> str:
  import numpy as np

  a, b = np.asarray(a), np.asarray(b)
  n = min(a.shape[1], b.shape[1])
  return f"{np.mean(np.all(a[:, :n] == b[:, :n], axis=1)) * 100:.0f}%"


def _print_ratios(method: str, precision: str, best: dict, args) -> None:
  """t5jax at `precision` (its best XLA variant) against transformers at its best (float32) and
  CTranslate2 at the same precision: time ratios and rows with the same tokens."""
  tag = "t5jax" if precision == "none" else f"t5jax {precision} "
  ours = [n for n in best if n.startswith(tag) and (precision != "none" or n.count(" ") == 1)]
  if not ours:
    return
  ours = min(ours, key=lambda n: best[n]["time"])
  peers = [[n for n in best if n.startswith("torch")]]
  if precision in CT2_COMPUTE:
    peers.append([n for n in best if n.startswith(f"ct2 {CT2_COMPUTE[precision]} ")])
  for names in peers:
    if not names:
      continue
    ref = min(names, key=lambda n: best[n]["time"])
    same = ""
    if method != "sample":
      same = f"; same tokens: {_same_rows(best[ours]['seqs'], best[ref]['seqs'])} of rows"
    print(
      f"{method:8} {'speed-up':18} {best[ref]['time'] / best[ours]['time']:>28.2f}x  {ours} vs"
      f" {ref}, load {args.load}{same}",
      flush=True,
    )


def _seconds(r) -> float:
  return r["time"] if isinstance(r, dict) else r


def _print_matmul_floor(mm, results, methods):
  """The matmul-only times and the ceiling they put on the t5jax/transformers ratio."""
  print()
  print("dense matmuls of one generate call alone (seconds, best of each):")
  names = [n for n, rs in mm.items() if rs]
  print(f"{'method':8} " + " ".join(f"{n:>20}" for n in names) + "  ceiling")
  for method in methods:
    best = {n: min(r["methods"][method] for r in mm[n]) for n in names}
    ref = [
      min(r["methods"][method]["time"] for r in rs)
      for n, rs in results.items()
      if n.startswith("torch") and rs
    ]
    ceiling = ""
    xla = [n for n in best if n.startswith("matmuls xla")]
    if ref and xla:
      each = ", ".join(f"{n[8:]} {min(ref) / best[n]:.2f}x" for n in xla)
      ceiling = f"  {each} (best transformers generate / XLA matmuls alone)"
    print(f"{method:8} " + " ".join(f"{best[n]:20.3f}" for n in names) + ceiling)


if __name__ == "__main__":
  main()
