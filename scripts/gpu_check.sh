#!/usr/bin/env bash
# The GPU check: one prepared run, at most about 8 minutes on an H100/H200, that writes
# everything to one folder (default: $OUT where the device tool sets it, else gpu_check/):
#
#   summary.txt              device, versions, each part's exit code and seconds, the verdicts
#   log.txt                  every part's full output
#   bench_engine_gpu.md      engine vs minimal loop, VGG-16 and preact ResNet-18 (fp32; bf16 +
#                            channels_last + compile against fp32)
#   bench_optim_gpu.md       SGD vs K-FAC vs EKFAC per step, same models, batch 128, statistics
#                            every 10 steps, inverses every 100, fp32 and bf16
#   bench_sequences_gpu.md   the LSTM family against cuDNN's LSTM
#   train_metrics.jsonl      3 minutes of VGG-16 + K-FAC on CIFAR-shaped synthetic data
#                            (learnable labels), killed by SIGTERM and resumed
#
# It needs only python3 with torch, torchvision, tensorboard, rich, numpy, PyYAML and pytest:
# Hydra and omegaconf come from .whl/ (scripts/gpu_wheels.sh makes it where pip works).
#
#   scripts/gpu_check.sh [FOLDER]          # on the GPU machine
#   DRY_RUN=1 scripts/gpu_check.sh /tmp/x  # on a CPU: every part, tiny, LeNet-5 for the big models
set -uo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-${OUT:-gpu_check}}
mkdir -p "$DIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 NO_COLOR=1 COLUMNS=200
if ! "$PY" -c "import hydra, omegaconf" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/ngexp-site .whl/*.whl || { echo "no Hydra: run scripts/gpu_wheels.sh" >&2; exit 2; }
  export PYTHONPATH=/tmp/ngexp-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

if [ -n "${DRY_RUN:-}" ]; then
  DEVICE=cpu; ENGINE="--steps 2 --rounds 1"; OPTIM="--rounds 1 --warmup-steps 1 --inv-update-freq 4 --cov-update-freq 2"
  SEQ="--lengths 28 --min-rounds 1 --budget 1 --warmup 0"; TRAIN_S=40; RESUME_S=20; DATA_N=512
  MODELS="lenet5"; TRAIN_MODEL=lenet5
  SCALE=3  # a CPU is slower: the same parts, longer limits
else
  DEVICE=cuda; ENGINE="--steps 50 --rounds 2"; OPTIM="--rounds 2 --warmup-steps 10"
  SEQ="--min-rounds 3 --budget 8"; TRAIN_S=120; RESUME_S=30; DATA_N=50000
  MODELS="vgg16 preact_resnet18"; TRAIN_MODEL=vgg16
  SCALE=1
fi

summary() { echo "$*" | tee -a "$DIR/summary.txt"; }
part() {  # part NAME SECONDS COMMAND...: run with a time limit, log it, record rc and seconds
  local name=$1 limit=$(( $2 * SCALE )) start rc; shift 2
  echo "===== $name: $*" >> "$DIR/log.txt"
  start=$(date +%s)
  timeout --signal=TERM --kill-after=45 "$limit" "$@" >> "$DIR/log.txt" 2>&1; rc=$?
  summary "$name: rc=$rc in $(( $(date +%s) - start ))s (limit ${limit}s)"
  return $rc
}

: > "$DIR/summary.txt"; : > "$DIR/log.txt"
summary "ngexp GPU check $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null \
  | sed 's/^/gpu: /' | tee -a "$DIR/summary.txt"
"$PY" -c "import torch, hydra, sys; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| cuda', torch.version.cuda, '| cudnn', torch.backends.cudnn.version(), '| hydra', hydra.__version__)" \
  | tee -a "$DIR/summary.txt"

# 1. the gpu-marked tests (sync-debug mode, GPU resume, bf16 + channels_last + compile)
part pytest_gpu 100 "$PY" -m pytest -q -m gpu -p no:cacheprovider -x tests/test_gpu.py
# 2. the engine's throughput: overhead in fp32, the fast path against the fp32 minimal loop
part bench_engine 70 "$PY" scripts/bench_engine.py --gpu --device "$DEVICE" --models $MODELS $ENGINE \
  --out "$DIR/bench_engine_gpu.md"
# 3. second-order step cost against SGD at CIFAR shapes, batch 128, fp32 and bf16
part bench_optim 100 "$PY" scripts/bench_optim.py --device "$DEVICE" --models $MODELS \
  --data synthetic_cifar --optimizers sgd kfac ekfac --precisions fp32 bf16 --batch-size 128 $OPTIM \
  --out "$DIR/bench_optim_gpu.md"
# 4. the LSTM family against cuDNN's LSTM
part bench_sequences 30 "$PY" scripts/bench_sequences.py --device "$DEVICE" --threads 1 $SEQ \
  --out "$DIR/bench_sequences_gpu.md"
# 5. real training: VGG-16 + K-FAC, bf16, channels_last, compile; SIGTERM, then a resume
TRAIN=(-m ngexp train "model=$TRAIN_MODEL" optimizer=kfac data=synthetic data.labels=linear
       "data.num_train=$DATA_N" data.num_test=1000 trainer.batch_size=128 trainer.epochs=50
       "trainer.device=$DEVICE" trainer.precision=bf16 trainer.channels_last=true
       trainer.compile=true trainer.log_every=20 trainer.progress=plain
       "output_root=/tmp/ngexp-gpu-check")
rm -rf /tmp/ngexp-gpu-check
part train_vgg16_kfac "$TRAIN_S" "$PY" "${TRAIN[@]}"
part resume_vgg16_kfac "$RESUME_S" "$PY" "${TRAIN[@]}"
RUN=$(dirname "$(find /tmp/ngexp-gpu-check -name metrics.jsonl | head -1)")
cp "$RUN/metrics.jsonl" "$DIR/train_metrics.jsonl" 2>/dev/null
"$PY" - "$RUN" <<'EOF' | tee -a "$DIR/summary.txt"
import json, math, sys
from pathlib import Path
run = Path(sys.argv[1])
summary = json.loads((run / "summary.json").read_text())
losses = [r["train/loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
          if "train/loss" in r]
resumed = "resuming from step" in (run / "train.log").read_text()
finite = bool(losses) and all(math.isfinite(x) for x in losses)
print(f"training: status {summary['status']} ({summary.get('reason', '')}), step {summary['step']}, "
      f"{len(losses)} records, loss {losses[0]:.3f} -> {losses[-1]:.3f}, resumed: {resumed}")
verdict = finite and summary["status"] in ("interrupted", "completed") and resumed
print("training verdict:", "OK (finite, not diverged, resumed)" if verdict else "FAILED")
EOF
summary "done $(date -u +%FT%TZ)"
