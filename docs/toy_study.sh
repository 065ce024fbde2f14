#!/usr/bin/env bash
# The paper's studies on the toy world, 3 seeds each: methods, OT variants, density × fidelity, selection by
# quality.py, synthetic scale. Two single-thread runs at a time (one per core of a 2-core CPU, where a SENSE run then
# takes ~4.5 minutes): sections 1-3 about 100 minutes, section 4 (6× scale) about 10 more.
#
#   bash docs/toy_study.sh                 # runs/study/<study>/<group>_s<seed>/ ; rerun to finish what was cut short
#   bash docs/toy_study.sh summarize       # the README's tables: runs/study/<study>.md (python eval.py --summarize)
#
# Runs shared between studies (the default SENSE run is dense-fine, 2×, OT at the paper's settings) are links to
# the one run folder, so every table counts the same seeds.
set -euo pipefail
shopt -s nullglob  # a group with no finished run yet is left out of its table
cd "$(dirname "$0")/.."
S=runs/study
SEEDS="0 1 2"

summarize() {
  python eval.py --summarize $S/methods/{supervised_B,supervised_2B,pseudo,soft,sense}_s[0-9] --per-class --out $S/methods.md
  python eval.py --summarize $S/ot/{sense,plan_gate,prior,iters_100,beta_0.5}_s[0-9] --per-class --out $S/ot.md
  python eval.py --summarize $S/factors/{sparse_coarse,sparse_fine,dense_coarse,dense_fine}_s[0-9] --out $S/factors.md
  python eval.py --summarize $S/select/{bottom,random,top}_s[0-9] --out $S/select.md
  python eval.py --summarize $S/scale/{x1,x2,x4,x6}_s[0-9] --out $S/scale.md
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

# 1. methods: the supervised baselines (B and 2B real images per step), the teacher's labels without OT, SENSE
for s in $SEEDS; do
  echo "$S/methods/supervised_B_s$s --method supervised --seed $s"
  echo "$S/methods/supervised_2B_s$s --method supervised --real-batch 16 --seed $s"
  echo "$S/methods/pseudo_s$s --method pseudo --seed $s"
  echo "$S/methods/soft_s$s --method soft --seed $s"
  echo "$S/methods/sense_s$s --seed $s"
done | run_all

# 2. the selection pool scored by the seed-0 supervised model (density) and GLCM (fidelity); top / bottom / random half
python quality.py score --images data/toy/synthetic_pool.txt --teacher $S/methods/supervised_B_s0/last.pt \
  --out $S/select/scores.csv
python quality.py select --scores $S/select/scores.csv --by both --top 0.5 --out $S/select/top.txt
python quality.py select --scores $S/select/scores.csv --by both --bottom 0.5 --out $S/select/bottom.txt
python quality.py select --scores $S/select/scores.csv --by random --top 0.5 --out $S/select/random.txt

# 3. OT variants, density × fidelity, selection, scale: seed 0 of every group first, then seed 1, then seed 2, so
# that a study cut short still has every group at the same number of seeds
for s in $SEEDS; do
  link $S/methods/sense_s$s $S/ot/sense_s$s
  link $S/methods/sense_s$s $S/factors/dense_fine_s$s
  link $S/methods/sense_s$s $S/scale/x2_s$s
done
for s in $SEEDS; do
  echo "$S/ot/plan_gate_s$s --ot-gate plan --seed $s"
  echo "$S/ot/prior_s$s --ot-marginal prior --seed $s"
  echo "$S/ot/iters_100_s$s --ot-iters 100 --seed $s"
  echo "$S/ot/beta_0.5_s$s --ot-beta 0.5 --seed $s"
  for kind in sparse_coarse sparse_fine dense_coarse; do
    echo "$S/factors/${kind}_s$s --synthetic data/toy/synthetic_$kind.txt --seed $s"
  done
  for half in top bottom random; do
    echo "$S/select/${half}_s$s --synthetic $S/select/$half.txt --seed $s"
  done
  for m in 1 4; do
    echo "$S/scale/x${m}_s$s --synthetic data/toy/synthetic_x$m.txt --seed $s"
  done
done | run_all
# 4. last, if there is time: 6× synthetic
for s in $SEEDS; do
  echo "$S/scale/x6_s$s --synthetic data/toy/synthetic_x6.txt --seed $s"
done | run_all
summarize
