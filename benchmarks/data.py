"""Input pipeline at scale: flat memory, throughput against the tokenizer, deep resume.

  python -m benchmarks.data                                  # 5 GB against 50 MB (the targets)
  python -m benchmarks.data --big_gb 1 --skip baseline       # smaller, without today's figures
  python -m benchmarks.data --only throughput --tokenizer spiece.model   # T5's own vocabulary

Synthetic corpora (Zipf-distributed words, documents of ~60-900 words, like web text) are written
under a temporary folder (`--tmp`, removed at the end): text (one document per line, span
corruption) and TSV (input<TAB>target, text-to-text), each as files of `--shard_mb`.

1. Flat memory: peak RSS (`ru_maxrss` of the child, from `wait4`) and time to the first step
   (until metrics.jsonl holds its first train row) of `train.py --config configs/demo.py` with a
   tiny model for 5 steps, ByT5 ids, in a fresh process, on --small_mb and on --big_gb, for the
   TSV path and the span-corruption path. The same commands run on the code before streaming
   (commit 72c5e13, extracted with `git archive` into the temporary folder, or --baseline_dir),
   which reads every file whole; those runs are stopped past --baseline_rss_gb of RSS or
   --baseline_timeout seconds, and the report says how far they got.
2. Throughput at 512/114 with packing: examples/s and examples per CPU-second (process CPU time,
   background threads included) of `data.make_datasets(...).train` alone, from raw text and from
   prepared shards (`t5jax.prepare` of the same text, as 568-token chunks and as documents),
   next to SentencePiece's own per-document `encode` of the same text, timed before and after
   the raw run (the floor of the raw path: tokens/s / 568 raw tokens per example),
   and the cores one host needs for 1,000 examples/s. The tokenizer: --tokenizer, or a unigram
   model of --spm_vocab pieces trained on a sample of the corpus.
3. Deep resume: `set_state` of a position --resume_depth into a big text shard against a fresh
   start: time to the first batch (a streamed file is re-read, not re-tokenized, up to the
   position; prepared shards jump there).

Numbers depend on the machine and its load: the report prints `uptime` before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BASELINE_COMMIT = "72c5e13"
TINY = [
  "--config.model.d_model=32",
  "--config.model.d_kv=8",
  "--config.model.d_ff=64",
  "--config.model.num_heads=2",
  "--config.model.num_layers=1",
  "--config.model.num_decoder_layers=1",
  "--config.batch_size=8",
  "--config.progress_bar=False",
  "--config.log_every=1",
  "--config.num_train_steps=5",
  "--config.checkpoint_every=5",
  "--config.eval_every=5",
  "--config.data.tokenizer=byt5",
  "--config.data.max_input_length=128",
  "--config.data.max_target_length=32",
]


def uptime() -> str:
  with contextlib.suppress(OSError, subprocess.SubprocessError):
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
  return "?"


# ------------------------------------------------------------------------------------------------
# Synthetic corpora.


def _vocabulary(rng, n=30_000):
  letters = np.array(list("etaoinshrdlucmfwypvbgkqjxz"))
  p = 1.0 / np.arange(1, len(letters) + 1)
  lengths = np.clip(rng.poisson(5, n), 1, 14)
  words = ["".join(rng.choice(letters, size=k, p=p / p.sum())) for k in lengths]
  return np.array(words, dtype=object)


def _documents(rng, words, count):
  ranks = 1.0 / np.arange(1, len(words) + 1) ** 1.1
  ranks /= ranks.sum()
  docs = []
  for _ in range(count):
    n = int(np.clip(rng.lognormal(5.6, 0.7), 60, 900))
    w = rng.choice(words, size=n, p=ranks)
    stops = rng.random(n) < 0.07
    w = [x + "." if s else x for x, s in zip(w, stops, strict=True)]
    docs.append(" ".join(w).capitalize() + ".")
  return docs


def write_corpus(folder: str, kind: str, total_bytes: int, shard_bytes: int, seed=0) -> list[str]:
  """Text (`docs-*.txt`) or TSV (`pairs-*.tsv`) files summing to ~total_bytes: documents drawn
  from a pool of 20k synthetic ones, each line made unique by its number."""
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  pool = _documents(rng, _vocabulary(rng), 20_000 if total_bytes > 100e6 else 4_000)
  if kind == "tsv":
    pool = [d[: len(d) * 3 // 4].replace("\t", " ") + "\t" + d[len(d) * 3 // 4 :] for d in pool]
  files, written, k, line = [], 0, 0, 0
  while written < total_bytes:
    path = os.path.join(folder, f"{'pairs' if kind == 'tsv' else 'docs'}-{k:05d}.{kind}")
    size = 0
    with open(path, "w", encoding="utf-8") as f:
      while size < shard_bytes and written + size < total_bytes:
        picks = rng.integers(0, len(pool), 2000)
        block = "".join(f"{line + j} {pool[p]}\n" for j, p in enumerate(picks))
        line += len(picks)
        f.write(block)
        size += len(block.encode("utf-8"))
    files.append(path)
    written += size
    k += 1
  return files


# ------------------------------------------------------------------------------------------------
# 1. Training starts in fresh processes.


def _train_start(code_dir: str, workdir: str, args: list[str], rss_cap: float, timeout: float):
  """Runs train.py of `code_dir`; returns peak RSS (GB), seconds to the first step, and status."""
  import psutil

  env = {**os.environ, "PYTHONPATH": code_dir, "JAX_PLATFORMS": "cpu"}
  cmd = [sys.executable, "train.py", "--config=configs/demo.py", f"--workdir={workdir}", *args]
  t0 = time.time()
  proc = subprocess.Popen(
    cmd, cwd=code_dir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
  )
  ps = psutil.Process(proc.pid)
  metrics = os.path.join(workdir, "metrics.jsonl")
  first_step, peak, status = None, 0.0, "ok"
  while True:
    pid, st, usage = os.wait4(proc.pid, os.WNOHANG)
    if pid:
      break
    with contextlib.suppress(psutil.Error):
      peak = max(peak, ps.memory_info().rss / 1e9)
    if first_step is None and os.path.exists(metrics):
      with open(metrics) as f:
        if any(json.loads(r).get("split") == "train" for r in f if r.strip()):
          first_step = time.time() - t0
    if peak > rss_cap or time.time() - t0 > timeout:
      status = f"stopped at {peak:.1f} GB RSS after {time.time() - t0:.0f} s"
      proc.kill()
      pid, st, usage = os.wait4(proc.pid, 0)
      break
    time.sleep(0.1)
  proc.returncode = os.waitstatus_to_exitcode(st)
  err = proc.stderr.read().decode("utf-8", "replace").strip()
  if status == "ok" and proc.returncode != 0:
    status = f"exit {proc.returncode}: {err.splitlines()[-1][:200] if err else ''}"
  rss = usage.ru_maxrss / 1e6  # kB on Linux
  return {"rss_gb": rss, "first_step_s": first_step, "wall_s": time.time() - t0, "status": status}


def memory_section(args, tmp: str, corpora: dict) -> list[str]:
  out = ["## 1. Training start (tiny model, 5 steps, ByT5, fresh process): peak RSS, first step"]
  codes = [("streaming (this tree)", REPO)]
  if "baseline" not in args.skip:
    base = args.baseline_dir or os.path.join(tmp, "baseline")
    if not args.baseline_dir:
      os.makedirs(base)
      archive = subprocess.run(
        ["git", "-C", REPO, "archive", BASELINE_COMMIT], capture_output=True, check=True
      ).stdout
      subprocess.run(["tar", "-x", "-C", base], input=archive, check=True)
    codes.append((f"before streaming ({BASELINE_COMMIT})", base))
  paths = {"tsv": ["--config.data.kind=tsv"], "text": ["--config.data.kind=span_corruption"]}
  # A warm-up run fills the persistent compilation cache, so compiling weighs the same in each.
  os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(tmp, "jax_cache")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  for kind in paths:
    _train_start(
      REPO,
      os.path.join(tmp, f"warm_{kind}"),
      [*TINY, *paths[kind], f"--config.data.train_file={corpora[('small', kind)][0]}"],
      99,
      args.baseline_timeout,
    )
  out.append(f"| code | path | corpus | peak RSS GB | first step s | status |\n|{'---|' * 6}")
  results = {}
  for label, code in codes:
    for kind in paths:
      for size in ("small", "big"):
        files = corpora[(size, kind)]
        # The code before streaming reads one file per split: give it the concatenation.
        spec = ",".join(files) if code == REPO else _concatenated(tmp, files)
        wd = os.path.join(tmp, f"wd_{len(results)}")
        cap = args.baseline_rss_gb if code != REPO else 99
        r = _train_start(
          code,
          wd,
          [*TINY, *paths[kind], f"--config.data.train_file={spec}"],
          cap,
          args.baseline_timeout,
        )
        results[(label, kind, size)] = r
        first = f"{r['first_step_s']:.1f}" if r["first_step_s"] else "-"
        size_s = f"{_size_gb(files):.2f} GB"
        row = f"| {label} | {kind} | {size_s} | {r['rss_gb']:.2f} | {first} | {r['status']} |"
        out.append(row)
        print(row, flush=True)
        shutil.rmtree(wd, ignore_errors=True)
  for label, _ in codes:
    for kind in paths:
      s, b = results[(label, kind, "small")], results[(label, kind, "big")]
      if s["first_step_s"] and b["first_step_s"]:
        out.append(
          f"- {label}, {kind}: RSS big/small {b['rss_gb'] / s['rss_gb']:.2f}x (target <= 1.10), "
          f"first step big/small {b['first_step_s'] / s['first_step_s']:.2f}x (target <= 2)"
        )
  return out


def _size_gb(files):
  return sum(os.path.getsize(f) for f in files) / 1e9


def _concatenated(tmp, files):
  if len(files) == 1:
    return files[0]
  path = os.path.join(
    tmp, "concat-" + os.path.basename(os.path.dirname(files[0])) + os.path.splitext(files[0])[1]
  )
  if not os.path.exists(path):
    with open(path, "wb") as out:
      for f in files:
        with open(f, "rb") as src:
          shutil.copyfileobj(src, out, 1 << 24)
  return path


# ------------------------------------------------------------------------------------------------
# 2. Throughput.


def _span_cfg(train_file, **kw):
  from t5jax.train_config import DataConfig

  return DataConfig(
    kind="span_corruption",
    train_file=train_file,
    max_input_length=512,
    max_target_length=114,
    pack=True,
    **kw,
  )


class _Timed:
  """A training iterator timed a share at a time: `share(batches)` -> examples per CPU-second
  (and per second of wall time) over the next `batches` batches."""

  def __init__(self, cfg, tok, batch_size):
    from t5jax import data

    t0 = time.perf_counter()
    self.it = data.make_datasets(cfg, tok, batch_size=batch_size, seed=0).train
    next(self.it)
    self.first = time.perf_counter() - t0
    self.cpu, self.wall = [], []

  def share(self, batches):
    w0, c0, n = time.perf_counter(), time.process_time(), 0
    for _ in range(batches):
      b = next(self.it)
      n += int(b["encoder_segment_ids"].max(axis=1).sum())
    self.cpu.append(n / (time.process_time() - c0))
    self.wall.append(n / (time.perf_counter() - w0))


def _med(xs):
  return float(np.median(xs))


def _spread(xs, fmt):
  return f"{_med(xs):{fmt}} (median; {min(xs):{fmt}}-{max(xs):{fmt}})"


def throughput_section(args, tmp, tok, text_files) -> list[str]:
  from t5jax import data, prepare

  out = ["## 2. Throughput: span corruption at 512/114, packed (one process, in-process iterator)"]
  raw_len = data.span_corruption_raw_length(512, 114, 0.15, 3.0)
  docs = [d for _, d in zip(range(args.floor_docs), _docs_of(text_files), strict=False)]
  sp = tok.sp if hasattr(tok, "sp") else None
  spec = ",".join(text_files)
  # Prepared as chunks of the raw length (what --chunk_length=568 writes; read as whole blocks)
  # and as one record per document (concatenated and split while training).
  dirs = {}
  for layout, chunk_length in (("chunks", raw_len), ("documents", 0)):
    dirs[layout] = os.path.join(tmp, f"prepared_{layout}")
    t0 = time.perf_counter()
    m = prepare.prepare(
      spec,
      dirs[layout],
      tok,
      kind="text",
      tokenizer_name="benchmark",
      num_workers=args.prepare_workers,
      chunk_length=chunk_length,
    )
    stored = sum(os.path.getsize(os.path.join(dirs[layout], s["file"])) for s in m["shards"])
    out.append(
      f"- prepare --chunk_length={chunk_length} ({args.prepare_workers or 'auto'} workers): "
      f"{sum(s['records'] for s in m['shards']):,} records, {_size_gb(text_files) * 1e3:.0f} MB "
      f"of text -> {stored / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s"
    )
  timed = {"raw": _Timed(_span_cfg(spec), tok, args.batch_size)}
  for layout, d in dirs.items():
    timed[layout] = _Timed(_span_cfg(d), tok, args.batch_size)
  floors: list[float] = []  # examples per CPU-s of the tokenizer alone, on the same documents
  # The load on a shared machine moves within seconds, so the four take turns: each round times
  # the tokenizer alone, then a share of raw-text batches, then of each prepared layout, and each
  # ratio is the median of the rounds' ratios (one round's numbers are seconds apart).
  rounds = max(args.rounds, 1)
  for _ in range(rounds):
    c0 = time.process_time()
    ntok = sum(len(sp.encode(d)) if sp else len(tok.encode(d)) for d in docs)
    floors.append(ntok / (time.process_time() - c0) / raw_len)
    timed["raw"].share(max(args.batches // rounds, 1))
    for layout in dirs:
      timed[layout].share(max(args.batches * 4 // rounds, 1))
  raw = np.array(timed["raw"].cpu)
  floors = np.array(floors)
  out.append(
    f"- SentencePiece alone (`encode` per document, {len(docs)} docs, {rounds} rounds): "
    f"{_spread(floors, ',.0f')} examples per CPU-s ({raw_len} raw tokens each), the floor"
  )
  out.append(
    f"- raw text: {_spread(raw, ',.0f')} examples per CPU-s (first batch "
    f"{timed['raw'].first:.1f} s); {_spread(raw / floors, '.2f')}x the "
    "tokenizer alone (target >= 0.7)"
  )
  for layout in dirs:
    t = timed[layout]
    out.append(
      f"- prepared {layout}: {_spread(t.cpu, ',.0f')} examples per CPU-s (first batch "
      f"{t.first:.1f} s); {_spread(np.array(t.cpu) / raw, '.1f')}x raw text"
      f"{' (target >= 10)' if layout == 'chunks' else ''}"
    )
  out.append(
    f"- cores for 1,000 examples/s (t5-v1_1-base on one H100): raw text {1000 / _med(raw):.2f}, "
    f"prepared chunks {1000 / _med(timed['chunks'].cpu):.3f} (from the median examples per CPU-s; "
    "plus the training process itself)"
  )
  return out, dirs["chunks"]


def _docs_of(files):
  from t5jax import sources

  for f in files:
    for _, d in sources.iter_records(f, "text"):
      yield d


# ------------------------------------------------------------------------------------------------
# 3. Deep resume.


def _find(state, keys):
  """The dicts inside a nested state holding every key of `keys`."""
  if isinstance(state, dict):
    if keys <= set(state):
      yield state
    for v in state.values():
      yield from _find(v, keys)
  elif isinstance(state, list):
    for v in state:
      yield from _find(v, keys)


def _count_lines(path):
  n = 0
  with open(path, "rb") as f:
    while block := f.read(1 << 24):
      n += block.count(b"\n")
  return n


def _line_offset(path, line):
  """The byte offset where line `line` (0-based) of a file starts."""
  pos, seen = 0, 0
  with open(path, "rb") as f:
    while block := f.read(1 << 24):
      n = block.count(b"\n")
      if seen + n >= line:
        k = -1
        for _ in range(line - seen):
          k = block.index(b"\n", k + 1)
        return pos + k + 1
      seen, pos = seen + n, pos + len(block)
  raise ValueError(f"{path} has fewer than {line} lines")


def resume_section(args, tok, big_text, prep_dir) -> list[str]:
  from t5jax import data

  out = [
    "## 3. Deep resume: time to the first batch after set_state, against a fresh start "
    f"(median of {args.resume_repeats} turns of fresh / shallow / deep)"
  ]

  def start(cfg, state=None):  # seconds from a new iterator to its first batch
    t0 = time.perf_counter()
    it = data.make_datasets(cfg, tok, batch_size=args.batch_size, seed=0).train
    if state is not None:
      it.set_state(json.loads(json.dumps(state)))
    next(it)
    return time.perf_counter() - t0, it

  for label, spec, deep in (
    ("raw text", ",".join(big_text), "stream"),
    ("prepared", prep_dir, "index"),
  ):
    if spec is None:
      continue
    # Files in their listed order (no shuffle), so the last one of the epoch is big_text[-1].
    cfg = _span_cfg(spec, shuffle=False)
    _, it = start(cfg)
    next(it)
    shallow = it.get_state()  # two batches in
    state = json.loads(json.dumps(shallow))
    if deep == "stream":
      lines = _count_lines(big_text[-1])
      target = int(lines * args.resume_depth)
      offset = _line_offset(big_text[-1], target)
      for s in _find(state, {"epoch", "file", "record", "window", "taken"}):
        s["file"], s["record"], s["offset"] = len(big_text) - 1, target, offset
      where = (
        f"line {target:,} of the last of {len(big_text)} shards ({lines:,} lines, "
        f"{_size_gb(big_text[:1]):.2f} GB each; {_size_gb(big_text):.1f} GB in all)"
      )
    else:
      found = list(_find(state, {"epoch", "window", "taken"}))
      for s in found:
        s["epoch"] = int(s["epoch"]) + 1000
      where = f"1000 epochs later ({len(found)} chunk-block state moved)"
    times = {"fresh": [], "shallow": [], "deep": []}
    for _ in range(max(args.resume_repeats, 1)):
      times["fresh"].append(start(cfg)[0])
      times["shallow"].append(start(cfg, shallow)[0])
      times["deep"].append(start(cfg, state)[0])
    med = {k: float(np.median(v)) for k, v in times.items()}
    ratios = [d / f for d, f in zip(times["deep"], times["fresh"], strict=True)]
    out.append(
      f"- {label}: fresh start {med['fresh']:.3f} s, resume two batches in {med['shallow']:.3f} "
      f"s, resume at {where} {med['deep']:.3f} s ({med['deep'] / med['fresh']:.2f}x a fresh "
      f"start, per turn {min(ratios):.2f}-{max(ratios):.2f}x; target <= 2)"
    )
  return out


# ------------------------------------------------------------------------------------------------


def _tokenizer(args, tmp, text_files):
  from t5jax.tokenizer import load_tokenizer, train_sentencepiece

  if args.tokenizer:
    return load_tokenizer(args.tokenizer), args.tokenizer
  sample = [d for _, d in zip(range(args.spm_docs), _docs_of(text_files), strict=False)]
  t0 = time.perf_counter()
  tok = train_sentencepiece(sample, args.spm_vocab, os.path.join(tmp, "spm"))
  return (
    tok,
    f"unigram {tok.vocab_size} ids trained on {len(sample):,} docs in "
    f"{time.perf_counter() - t0:.0f} s",
  )


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--big_gb", type=float, default=5.0)
  p.add_argument("--small_mb", type=float, default=50.0)
  p.add_argument("--shard_mb", type=float, default=512.0, help="size of each corpus file")
  p.add_argument("--throughput_mb", type=float, default=40.0, help="text for section 2")
  p.add_argument(
    "--batches", type=int, default=40, help="batches timed from raw text (x4 prepared)"
  )
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument(
    "--rounds", type=int, default=5, help="turns of tokenizer / raw / prepared (median ratios)"
  )
  p.add_argument("--floor_docs", type=int, default=5000, help="documents SentencePiece encodes")
  p.add_argument("--tokenizer", default="", help="a SentencePiece .model (default: train one)")
  p.add_argument("--spm_vocab", type=int, default=8000)
  p.add_argument(
    "--spm_docs", type=int, default=20_000, help="documents the tokenizer trains on (32k: 100000)"
  )
  p.add_argument("--prepare_workers", type=int, default=0)
  p.add_argument("--resume_depth", type=float, default=0.9, help="fraction into a big shard")
  p.add_argument("--resume_repeats", type=int, default=5, help="turns of fresh/shallow/deep")
  p.add_argument("--baseline_dir", default="", help="a checkout of the code before streaming")
  p.add_argument("--baseline_rss_gb", type=float, default=8.0)
  p.add_argument("--baseline_timeout", type=float, default=900.0)
  p.add_argument("--only", default="", help="comma list of memory, throughput, resume")
  p.add_argument("--skip", default="", help="comma list of memory, baseline, throughput, resume")
  p.add_argument("--tmp", default="", help="where corpora go (default: a new temporary folder)")
  args = p.parse_args()
  sections = {"memory", "throughput", "resume"}
  if args.only:
    sections &= set(args.only.split(","))
  sections -= set(args.skip.split(","))
  tmp = tempfile.mkdtemp(prefix="t5jax_data_bench_", dir=args.tmp or None)
  report = [f"# benchmarks/data.py {' '.join(sys.argv[1:])}", f"load before: {uptime()}"]
  print(report[-1], flush=True)
  try:
    t0 = time.time()
    corpora = {}
    big, small, shard = args.big_gb * 1e9, args.small_mb * 1e6, args.shard_mb * 1e6
    kinds = ("tsv", "text") if "memory" in sections else ("text",)
    for kind in kinds:
      corpora[("small", kind)] = write_corpus(
        os.path.join(tmp, f"small_{kind}"), kind, small, shard
      )
      if "memory" in sections or "resume" in sections:
        corpora[("big", kind)] = write_corpus(os.path.join(tmp, f"big_{kind}"), kind, big, shard, 1)
    report.append(f"corpora written in {time.time() - t0:.0f} s under {tmp}")
    print(report[-1], flush=True)
    if "memory" in sections:
      report += memory_section(args, tmp, corpora)
    prep_dir = None
    if sections & {"throughput", "resume"}:
      text = write_corpus(os.path.join(tmp, "tput"), "text", args.throughput_mb * 1e6, shard, 2)
      tok, how = _tokenizer(args, tmp, text)
      report.append(f"tokenizer: {how}")
      if "throughput" in sections:
        lines, prep_dir = throughput_section(args, tmp, tok, text)
        report += lines
      if "resume" in sections:
        report += resume_section(args, tok, corpora[("big", "text")], prep_dir)
    report.append(f"load after: {uptime()}; peak RSS of this process {_self_rss():.2f} GB")
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  print("\n".join(report))


def _self_rss():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


if __name__ == "__main__":
  main()
