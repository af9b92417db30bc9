"""What the tests share, in one place: test modules import from here and never from each other.

- `helpers.hf_models`: the tiny random transformers models (one `make_hf_model` for the parity
  families and the decoding families) and the reference computations run on them;
- `helpers.runs`: the tiny training model, TSV data, run configs (in-process and as train.py
  flags) and readers of what a run wrote;
- `helpers.fork_server`: train.py runs as real processes forked from one warm server;
- `helpers.cli`: the scripts (train.py, decode.py) run in-process as their command lines;
- `helpers.decode_cli`: decode.py run that way with captured output, and its checkpoint;
- `helpers.batches`: pipeline batches taken and compared, span corruption undone;
- `helpers.stats`: the chi-square check of the sampling tests.

Fixtures used by more than one test module live in tests/conftest.py (which puts tests/ on
`sys.path`, so `import helpers` works from every test module); a fixture only one module uses
stays in that module. tests/scale_scripts/ holds the scripts test_scale.py runs as subprocesses
(and their `common.py`, which test_scale.py imports for its single-device references).
"""
