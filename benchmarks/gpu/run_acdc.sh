#!/bin/bash
# The GPU check of issues 9 and 10 in one timed script (benchmarks/gpu/README.md): on a bare GPU machine with
# nnunetv2's wheels installed in $SITE, from the repository root, with the packed ACDC development dataset in
# $DATA1 (partA.xz, labelsTr/, dataset.json, pre/: plans, fingerprint, splits) and $DATA2 (partB.xz):
#   unpack -> nnUNetv2_preprocess 2d + unlabelled -> bench_trainers.py (full plans, AMP) -> nnunet-semiseg benchmark
#   (plain vs ARCO_SAG vs MeanTeacher, 4 epochs sized to what is left of BUDGET seconds). Results land in $OUT.
# Dry run on CPU: OUT=/tmp/o WORK=/tmp/w DEV=cpu NP=2 NDA=2 SKIP_INSTALL=1 BENCH_IT=1 BENCH_WU=1 MIN_IT=2 MAX_IT=2
#   PRESET=cpu VAL_IT=1 BUDGET=3000 bash benchmarks/gpu/run_acdc.sh
set -u
export PYTHONUNBUFFERED=1
T0=$(date +%s); BUDGET=${BUDGET:-560}; DEADLINE=$((T0 + BUDGET))
DEV=${DEV:-cuda}; NP=${NP:-16}
left() { echo $((DEADLINE - $(date +%s))); }
# a timeout of at least 1 s: `timeout 0` would mean no limit at all
limit() { local s=$1; [ "$s" -lt 1 ] && s=1; echo $s; }
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a $OUT/steps.log; }
SITE=${SITE:-/root/site}; WHEELS=${WHEELS:-.whl2}; DATA1=${DATA1:-.dev1}; DATA2=${DATA2:-.dev2}
if [ -d $WHEELS ] && [ -z "${SKIP_INSTALL:-}" ]; then python3 -m pip install -q --no-index --no-deps --no-compile --target $SITE $WHEELS/*.whl 2>&1 | tail -3; fi
export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH} PATH=$SITE/bin:$PATH
W=${WORK:-/root/w}
export nnUNet_raw=$W/raw nnUNet_preprocessed=$W/pre nnUNet_results=$W/res nnUNet_extTrainer=$PWD/trainers
export nnUNet_def_n_proc=$NP nnUNet_n_proc_DA=${NDA:-12} nnUNet_compile=f
D=Dataset027_ACDC
stamp "start; python $(python3 -c 'import sys,torch;print(sys.version.split()[0], torch.__version__, torch.cuda.is_available())' 2>&1)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> $OUT/steps.log 2>&1; nproc >> $OUT/steps.log
mkdir -p $nnUNet_raw/$D $nnUNet_preprocessed/$D $nnUNet_results
python3 benchmarks/gpu/unpack.py $nnUNet_raw/$D $DATA1/partA.xz $DATA2/partB.xz 2>&1 | tail -2
cp -r $DATA1/labelsTr $DATA1/dataset.json $nnUNet_raw/$D/
cp $DATA1/pre/* $nnUNet_preprocessed/$D/
stamp "unpacked: $(ls $nnUNet_raw/$D/imagesTr | wc -l) labelled-folder images, $(ls $nnUNet_raw/$D/imagesTrUnlabeled | wc -l) unlabelled"
python3 -c "import sys; from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints import preprocess_entry as m; sys.argv=['nnUNetv2_preprocess','-d','27','-c','2d','-np','$NP']; m()" > $OUT/prep.log 2>&1 || { stamp "nnUNetv2_preprocess failed"; tail -c 2000 $OUT/prep.log; }
python3 -m nnunet_semiseg.cli preprocess-unlabeled -d 27 -c 2d -np $NP >> $OUT/prep.log 2>&1 || { stamp "preprocess-unlabeled failed"; tail -c 2000 $OUT/prep.log; }
stamp "preprocessed: $(ls $nnUNet_preprocessed/$D/nnUNetPlans_2d | wc -l) + $(ls $nnUNet_preprocessed/$D/nnUNetPlans_2d_unlabeled 2>/dev/null | wc -l) files"
# 1. cost per step, full plans, AMP (issue 10); capped so the accuracy runs keep their share
BT=${BENCH_TRAINERS:-nnUNetTrainer nnUNetTrainerMeanTeacher nnUNetTrainerARCO_SAG nnUNetTrainerACTIONpp nnUNetTrainerACTION nnUNetTrainerMONA nnUNetTrainerMONA:lambda_equivariance=0 nnUNetTrainerARCO_SG}
timeout $(limit $(( $(left) * 7 / 20 ))) python3 benchmarks/bench_trainers.py -d 27 -c 2d -p nnUNetPlans --device $DEV \
  --iterations ${BENCH_IT:-8} --warmup ${BENCH_WU:-2} --trainers $BT --json $OUT/bench_gpu.json > $OUT/bench_gpu.md 2>> $OUT/prep.log
stamp "bench_trainers rc=$?"; cat $OUT/bench_gpu.md; grep -a "measured\|failed\|Error\|error" $OUT/prep.log | tail -15 | cut -c1-400
# 2. accuracy: plain vs ARCO_SAG vs MeanTeacher, full plans, a schedule sized from the step times just measured
IT=$(python3 - "$OUT/bench_gpu.json" "$(left)" "${MIN_IT:-20}" "${MAX_IT:-250}" <<'P'
import json, sys
try:
    rows = {r['trainer']: r['whole_s'] for r in json.load(open(sys.argv[1]))['rows']}
except Exception:
    rows = {}
guess = {'nnUNetTrainer': 0.15, 'nnUNetTrainerARCO_SAG': 0.5, 'nnUNetTrainerMeanTeacher': 0.3}
per_it = sum(max(rows.get(t, g), 0.05) for t, g in guess.items()) * 1.3   # DA, per-epoch validation
budget = int(sys.argv[2]) - 3 * 45 - 25                                      # start-up + prediction per run, margin
print(max(int(sys.argv[3]), min(int(sys.argv[4]), int(budget / per_it / 4) // 5 * 5)))
P
)
stamp "benchmark: 4 x $IT iterations, $(left) s left"
timeout $(limit $(( $(left) - 15 ))) python3 -m nnunet_semiseg.cli benchmark -d 27 -c 2d --preset ${PRESET:-full} --device $DEV --epochs 4 --iterations $IT \
  --val-iterations ${VAL_IT:-10} -tr nnUNetTrainerARCO_SAG nnUNetTrainerMeanTeacher -o $W/bench > $OUT/benchmark.log 2>&1
stamp "benchmark rc=$?"
tail -25 $OUT/benchmark.log
cp $W/bench/benchmark.md $OUT/ 2>/dev/null
(cd $W/bench && tar czf $OUT/runs.tar.gz --exclude='*.pth' --exclude='*.nii.gz' --exclude='*.npz' --exclude='*.pkl' . 2>/dev/null)
cat $OUT/benchmark.md 2>/dev/null
stamp "end"
