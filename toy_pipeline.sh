#!/usr/bin/env bash
# The whole phi-1 pipeline at toy scale on one CPU machine: no GPU, no API key, and no network
# given offline copies of tiktoken's files and MBPP (README.md: "The pipeline at toy scale").
#
#   bash toy_pipeline.sh                  # about 12 minutes on 2 cores; outputs land in out/toy
#
# Run again after an interruption, it goes on: each stage resumes its output or finds it
# done (remove $OUT, or give another OUT, to start anew). Keep the settings of the first
# run: a stage found done is not redone for other sizes. Stop it with Ctrl-C (a signal to
# its process group, or to the script alone): the running stage keeps what it has done.
#
# The sizes below are the defaults; tests/test_toy_pipeline.py runs the same script with
# tiny ones. A model trained for minutes is no teacher: it writes the textbooks (any text will do),
# but exercises must parse and annotations must end in a score, so those come from a
# stand-in teacher (tests/llm_server.py: valid made-up exercises, and educational value
# by a rule: docstrings and comments per line). At paper scale both
# roles are GPT-4 / GPT-3.5 behind the same --api_base.
set -euo pipefail
fail_args() { echo "error: toy_pipeline.sh takes no arguments: its settings are environment variables (see --help)" >&2
              exit 2; }
case "${1-none}" in  # the settings are the environment variables below ("" is an argument too)
  none) [ $# -eq 0 ] || fail_args ;;
  -h|--help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; grep -E '^[A-Z_]+=\$\{' "$0"; exit 0 ;;
  *) fail_args ;;
esac
CALLER=$PWD  # a relative OUT or LOCAL_INPUTS is the caller's; the default OUT is the checkout's
cd "$(dirname "$0")"
from_caller() { case $1 in /*) printf '%s' "$1" ;; *) printf '%s/%s' "$CALLER" "$1" ;; esac; }

OUT=${OUT:-out/toy}                      # what this run writes (the local bins of stage 1 are shared)
LOCAL_INPUTS=${LOCAL_INPUTS:-}           # folders of .py files instead of this interpreter's
PRESET=${PRESET:-tiny}                   # model size for both pretraining runs: tiny or larger
PRETRAIN_ITERS=${PRETRAIN_ITERS:-200}    # steps of each pretraining run
FINETUNE_ITERS=${FINETUNE_ITERS:-100}    # finetuning steps
N_WEB=${N_WEB:-1000}                     # files in the "web" corpus that is filtered
N_ANNOTATE=${N_ANNOTATE:-300}            # of them annotated by the teacher
N_SYNTH=${N_SYNTH:-100}                  # textbook sections and exercises synthesized (2 at least)
EVAL_PROBLEMS=${EVAL_PROBLEMS:-0}        # HumanEval and MBPP problems evaluated (0: all)
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-64}     # tokens per benchmark completion
SERVE_PORT=${SERVE_PORT:-8011}           # sample.py --serve
TEACHER_PORT=${TEACHER_PORT:-8012}       # the stand-in teacher
[ "$OUT" = out/toy ] || OUT=$(from_caller "$OUT")
if [ -n "$LOCAL_INPUTS" ]; then
  IFS=, read -ra inputs <<< "$LOCAL_INPUTS"
  for i in "${!inputs[@]}"; do inputs[i]=$(from_caller "${inputs[i]}"); done
  LOCAL_INPUTS=$(IFS=,; echo "${inputs[*]}")
fi
fail() { echo "error: $*" >&2; exit 2; }
# the numbers, checked now rather than stages later, and written plainly (08 is 8, not octal)
whole() {  # $1: a variable's name, $2 and $3: its least and largest values, $4: what it is
  [[ ${!1} =~ ^[0-9]{1,9}$ ]] && (( 10#${!1} >= $2 && 10#${!1} <= $3 )) || fail "$1 must be $4, not '${!1}'"
  printf -v "$1" '%d' "$((10#${!1}))"
}
for name in PRETRAIN_ITERS FINETUNE_ITERS N_WEB N_ANNOTATE MAX_NEW_TOKENS; do
  whole "$name" 1 999999999 "a whole number above 0"
done
# one of each goes to validation: one textbook leaves stage 7 no validation tokens, one exercise stage 8 none to train
whole N_SYNTH 2 999999999 "a whole number above 1"
whole EVAL_PROBLEMS 0 999999999 "a whole number (0: all)"
whole SERVE_PORT 1 65535 "a port, from 1 to 65535"
whole TEACHER_PORT 1 65535 "a port, from 1 to 65535"
[ "$SERVE_PORT" != "$TEACHER_PORT" ] || fail "SERVE_PORT and TEACHER_PORT must differ, not both $SERVE_PORT"
python -c "import sys, model
if sys.argv[1] not in model.PRESETS:
    sys.exit(f'error: PRESET={sys.argv[1]} is no preset of model.py ({\", \".join(model.PRESETS)})')
context = model.PRESETS[sys.argv[1]].block_size  # stage 4's server refuses a prompt that fills it
if context < 256:  # the textbook prompts take 101 to 125 tokens (3000 drawn)
    sys.exit(f'error: PRESET={sys.argv[1]} has a context of {context} tokens, too short for the textbook prompts '
             f'of stage 4 (up to 125 tokens): choose tiny or a larger preset')" "$PRESET" || exit 2
[ -d "$OUT" ] || [ ! -e "$OUT" ] || fail "OUT=$OUT is a file, not a folder"
mkdir -p "$OUT"
stage() { echo; echo "=== $(date +%H:%M:%S) $*"; }
# Each stage runs in a process group of its own (set -m), which a signal to the script's group
# does not reach: on_signal passes each signal on to it once, whether the signal came to the
# group (Ctrl-C, timeout) or to the script alone (kill), so a second Ctrl-C still means "now".
set -m
CHILD=  # the stage's process, while it runs
run() {  # a stage's command, waited for in the background: a trap can then pass a signal on to it
  "$@" &
  CHILD=$!
  local status=0
  wait "$CHILD" || status=$?
  CHILD=
  return "$status"
}
on_signal() {  # $1: the signal to pass on, $2: the status to exit with once the stage has stopped
  if [ -n "$CHILD" ]; then
    kill -"$1" -- -"$CHILD" 2>/dev/null || true
    wait "$CHILD" || true  # (a second signal meanwhile runs on_signal again)
  fi
  exit "$2"
}
trap 'on_signal INT 130' INT
trap 'on_signal TERM 143' TERM
trap 'on_signal TERM 129' HUP  # a closed terminal: the stage stops as on SIGTERM
wait_for() {  # an OpenAI-compatible server (process $2) answering /v1/models
  python - "$1" "$2" <<'EOF'
import os, sys, time, urllib.request
for _ in range(600):
    try:
        urllib.request.urlopen(sys.argv[1] + "/models", timeout=1)
        sys.exit(0)
    except OSError:
        try:
            os.kill(int(sys.argv[2]), 0)
        except ProcessLookupError:
            sys.exit(f"the server for {sys.argv[1]} has exited (its error is above)")
        time.sleep(0.5)
sys.exit(f"no server at {sys.argv[1]}")
EOF
}

for port in "$SERVE_PORT" "$TEACHER_PORT"; do  # a server left from an earlier run would answer in place of ours (stage 3)
  python -c "import socket, sys; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('127.0.0.1', int(sys.argv[1])))" "$port" 2>/dev/null ||
    { echo "port $port is in use (a server left from an earlier run?): stop it, or set SERVE_PORT / TEACHER_PORT" >&2; exit 1; }
done

stage "1. web code: the Python files on this machine, as token bins and as a JSONL corpus"
if [ -n "$LOCAL_INPUTS" ]; then
  run python data/prepare.py --inputs="$LOCAL_INPUTS" --out_dir="$OUT/data" --name=local
  LOCAL_DATA="$OUT/data/local"
else
  run python data/prepare.py
  LOCAL_DATA=local_python
fi
run python data/prepare.py ${LOCAL_INPUTS:+--inputs="$LOCAL_INPUTS"} --output=jsonl --max_docs="$N_WEB" \
  --max_file_bytes=100000 --out_dir="$OUT" --name=web
WEB="$OUT/web/part-*.jsonl"  # filter.py expands the glob

stage "2. pretrain a small model on them"
run python train.py --preset="$PRESET" --data="$LOCAL_DATA" --out_dir="$OUT/base" --max_iters="$PRETRAIN_ITERS" \
  --eval_interval="$PRETRAIN_ITERS" --sample_tokens=0

stage "3. serve it, and start the stand-in teacher"
python sample.py --ckpt="$OUT/base/ckpt.pt" --serve --port="$SERVE_PORT" --model_name=base --quiet &
SERVER=$!
python tests/llm_server.py --port="$TEACHER_PORT" --model=teacher &
TEACHER=$!
stop_servers() {  # waited for, so that none outlives the script (and the shell prints no "Terminated")
  kill $SERVER $TEACHER 2>/dev/null || true
  wait $SERVER $TEACHER 2>/dev/null || true
}
trap stop_servers EXIT
wait_for "http://127.0.0.1:$SERVE_PORT/v1" $SERVER
wait_for "http://127.0.0.1:$TEACHER_PORT/v1" $TEACHER

stage "4. synthesize textbooks (our model) and exercises (the teacher)"
run python synth.py textbook --n="$N_SYNTH" --api_base="http://127.0.0.1:$SERVE_PORT/v1" --model=base \
  --out="$OUT/textbooks.jsonl" --max_tokens=128 --keep_cut_off --concurrency=16 --near_dup=1.0
run python synth.py exercises --n="$N_SYNTH" --api_base="http://127.0.0.1:$TEACHER_PORT/v1" --model=teacher \
  --out="$OUT/exercises.jsonl" --concurrency=16

stage "5. filter: annotate, embed, train the forest, keep the best half of the tokens"
run python filter.py annotate --corpus="$WEB" --n="$N_ANNOTATE" --labels="$OUT/annotations.jsonl" \
  --api_base="http://127.0.0.1:$TEACHER_PORT/v1" --model=teacher --concurrency=16
run python filter.py embed --ckpt="$OUT/base/ckpt.pt" --labels="$OUT/annotations.jsonl" \
  --embeddings="$OUT/embeddings.npy"
run python filter.py train --labels="$OUT/annotations.jsonl" --embeddings="$OUT/embeddings.npy" \
  --forest="$OUT/forest.npz" --n_trees=50
run python filter.py apply --corpus="$WEB" --forest="$OUT/forest.npz" --out="$OUT/filtered" \
  --top_fraction=0.5

stop_servers  # stages 4 and 5 were theirs: their memory and ports go now
trap - EXIT

stage "6. the mixture: filtered code and textbooks as token bins"
run python data/prepare.py --source=jsonl --inputs="$OUT/filtered/kept-*.jsonl" --out_dir="$OUT/data" --name=code \
  --val_fraction=0.05
run python data/prepare.py --source=jsonl --inputs="$OUT/textbooks.jsonl" --out_dir="$OUT/data" --name=textbooks \
  --val_fraction=0.2

stage "7. pretrain phi-1-base (toy) on the mixture"
run python train.py --preset="$PRESET" --data="$OUT/data/code:0.5,$OUT/data/textbooks:0.5" --out_dir="$OUT/phi1-base" \
  --max_iters="$PRETRAIN_ITERS" --eval_interval="$PRETRAIN_ITERS" --sample_tokens=0

stage "8. finetune on the exercises"
run python finetune.py --base="$OUT/phi1-base/ckpt.pt" --exercises="$OUT/exercises.jsonl" --out_dir="$OUT/phi1" \
  --batch_size=8 --total_batch_size=8 --max_iters="$FINETUNE_ITERS" --warmup_iters=10 --learning_rate=1e-3 \
  --eval_interval="$FINETUNE_ITERS" --checkpoint_interval="$FINETUNE_ITERS" --sample_tokens=0 --val_fraction=0.1

stage "9. evaluate on HumanEval and MBPP"
for bench in humaneval mbpp; do
  run python evaluate.py --bench=$bench --ckpt="$OUT/phi1/ckpt.pt" --out="$OUT/$bench" --limit="$EVAL_PROBLEMS" \
    --max_new_tokens="$MAX_NEW_TOKENS"
done

stage "10. decontamination report"
run python filter.py decontaminate --corpus="$OUT/exercises.jsonl" --results="$OUT/humaneval/results.jsonl" \
  --report="$OUT/decontamination.json"

stage "done: $OUT"
