#!/usr/bin/env bash
# The toy world's study, 3 seeds each: first the paper's preconditions (P1: synthetic images are useful, measured by
# training on their true layouts; P2: the supervised teacher's γ gate keeps every class), then the methods against
# the supervised baselines. Two single-thread runs at a time (one per core of a 2-core CPU): about 2 hours
# (section 1, the methods: ~80; section 2, the schedule: ~40).
#
#   bash docs/toy_study.sh                 # runs/study/<study>/<group>_s<seed>/ ; rerun to finish what was cut short
#   bash docs/toy_study.sh summarize       # the tables of docs/toy_study.md: runs/study/*.md
#   bash docs/toy_study.sh quick           # one seed of supervised_B, truth and sense, and their curves (~8 min)
set -euo pipefail
shopt -s nullglob  # a group with no finished run yet is left out of its table
cd "$(dirname "$0")/.."
S=runs/study
SEEDS="0 1 2"
STEPS=900  # the toy preset's schedule (train.py TOY_SCHEDULE); the baseline's 2× and 4× schedules below

summarize() {
  python eval.py --summarize $S/methods/{supervised_B,supervised_2B,truth,truth_gated,pseudo,soft,sense}_s[0-9] \
    --per-class --out $S/methods.md
  python eval.py --summarize $S/methods/{supervised_B,sense,plan_gate,pseudo_all}_s[0-9] --per-class --out $S/plan.md
  python eval.py --summarize $S/schedule/{supervised_B_x1,sense_x1,supervised_B_x2,sense_x2,supervised_B_x4}_s[0-9] \
    --per-class --out $S/schedule.md
  # P2: the γ gate of the final EMA teachers of supervised_B (one per seed) on 64 dense-fine synthetic images
  python quality.py gate --teacher $S/methods/supervised_B_s[0-9]/last.pt --images data/toy/synthetic.txt \
    --device cpu | tee $S/gate_supervised_B.md
  python quality.py gate --teacher $S/methods/sense_s[0-9]/last.pt --images data/toy/synthetic.txt \
    --device cpu | tee $S/gate_sense.md
}
if [ "${1:-}" = "summarize" ]; then summarize; exit 0; fi

run_all() {  # reads "folder flags..." lines; skips finished runs (--resume auto continues unfinished ones)
  xargs -P 2 -L 1 bash -c 'out=$0; mkdir -p "$out";
    OMP_NUM_THREADS=1 python train.py --out "$out" --resume auto "$@" >> "$out/train.log" 2>&1 ||
    echo "FAILED: $out (see $out/train.log)"'
}
link() { mkdir -p "$(dirname "$2")"; ln -sfn "$(realpath --relative-to="$(dirname "$2")" "$1")" "$2"; }

python data.py toy --root data/toy                  # the toy world (seconds), if not there yet
python model.py --backbone toy --num-classes 7      # the pretrained toy backbone (minutes), if not there yet

if [ "${1:-}" = "quick" ]; then  # for a class: the baseline, the upper bound and SENSE, one seed, with the curves
  for m in supervised truth sense; do echo "$S/quick/${m}_s0 --method $m --seed 0"; done | run_all
  python eval.py --plot $S/quick/{supervised,truth,sense}_s0 --out $S/quick/curves.png
  python eval.py --summarize $S/quick/{supervised,truth,sense}_s0 --per-class
  exit 0
fi

# 1. methods, seed by seed (a study cut short has every group at the same number of seeds): the supervised baselines
# (B and 2B real images per step), the controls on the synthetic images' true layouts (every pixel; the pixels the
# teacher's gate passes), the teacher's own labels without OT (hard, soft), SENSE, SENSE gated on the OT plan, and
# its control without OT and without a gate (the teacher's argmax on every pixel)
for s in $SEEDS; do
  echo "$S/methods/supervised_B_s$s --method supervised --seed $s"
  echo "$S/methods/truth_s$s --method truth --seed $s"
  echo "$S/methods/sense_s$s --seed $s"
  echo "$S/methods/truth_gated_s$s --method truth_gated --seed $s"
  echo "$S/methods/supervised_2B_s$s --method supervised --real-batch 16 --seed $s"
  echo "$S/methods/pseudo_s$s --method pseudo --seed $s"
  echo "$S/methods/soft_s$s --method soft --seed $s"
  echo "$S/methods/plan_gate_s$s --ot-gate plan --seed $s"
  echo "$S/methods/pseudo_all_s$s --method pseudo --conf-thresh 0 --seed $s"
done | run_all

# 2. the schedule: how far the supervised baseline is from levelling off (2× and 4× the default steps), and SENSE at
# 2× the steps, where the loop's own teacher has time to become sure of every class
for s in $SEEDS; do
  link $S/methods/supervised_B_s$s $S/schedule/supervised_B_x1_s$s
  link $S/methods/sense_s$s $S/schedule/sense_x1_s$s
done
for s in $SEEDS; do
  echo "$S/schedule/supervised_B_x2_s$s --method supervised --iters $((2 * STEPS)) --seed $s"
  echo "$S/schedule/sense_x2_s$s --iters $((2 * STEPS)) --seed $s"
done | run_all
for s in $SEEDS; do echo "$S/schedule/supervised_B_x4_s$s --method supervised --iters $((4 * STEPS)) --seed $s"; done | run_all
summarize
