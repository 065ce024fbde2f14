#!/usr/bin/env bash
# The toy world's study, 3 seeds each: first the paper's preconditions (P1: synthetic images are useful, measured by
# training on their true layouts; P2: the supervised teacher's γ gate keeps every class), then the methods against
# the supervised baselines, then the paper's two uses of density and fidelity (its Section 3 protocol: a fixed teacher
# labels each synthetic split, a student learns from that split alone; its quality ladder inside the SENSE loop).
# Two single-thread runs at a time (one per core of a 2-core CPU). At the 1800-step default, by the single runs' times
# (SENSE-like ~6 min, supervised_B ~3 min, supervised_B at 4x the steps ~11 min): 1, the methods, ~80 min; 2, the
# schedule, ~30 min. 3, the protocol: labelling ~2.5 min, then 24 supervised runs of ~3 min, ~40 min. 4, the ladder:
# 12 SENSE runs of ~6-8 min, ~40 min.
# 5, scale: 9 SENSE runs of ~7-13 min. 6, m2f: Mask2Former runs are ~3x DPT's (supervised ~9-15 min, SENSE, truth
# and pseudo ~19-21 min each, supervised at 2x the steps ~17 min), ~3 h for all 21 runs. 7, long_tail: supervised
# ~3 min, the others ~7-9 min, ~1 h 10 min for 21 runs.
#
#   bash docs/toy_study.sh                 # runs/study/<study>/<group>_s<seed>/ ; rerun to finish what was cut short
#   bash docs/toy_study.sh protocol        # one section only: methods, schedule, protocol, ladder, scale, m2f, long_tail
#   bash docs/toy_study.sh summarize       # the tables of docs/toy_study.md: runs/study/*.md
#   bash docs/toy_study.sh quick           # one seed of supervised_B, truth and sense, and their curves (~10 min)
set -euo pipefail
shopt -s nullglob  # a group with no finished run yet is left out of its table
cd "$(dirname "$0")/.."
S=runs/study
SEEDS="0 1 2"
KINDS="sparse_coarse sparse_fine dense_coarse dense_fine"  # the toy world's synthetic pools, 120 images each
STEPS=1800  # the toy preset's schedule (train.py TOY_SCHEDULE); the baseline's ½×, 2× and 4× schedules below

summarize() {
  python eval.py --summarize $S/methods/{supervised_B,supervised_2B,truth,truth_gated,pseudo,soft,sense}_s[0-9] \
    --per-class --out $S/methods.md
  python eval.py --summarize $S/methods/{supervised_B,sense,plan_gate,pseudo_all}_s[0-9] --per-class --out $S/plan.md
  python eval.py --summarize \
    $S/schedule/{supervised_B_half,supervised_B_x1,supervised_B_x2,supervised_B_x4,sense_x1}_s[0-9] \
    --per-class --out $S/schedule.md
  # P2: the γ gate of the final EMA teachers of supervised_B (one per seed) on the 40 dense-fine synthetic images
  python quality.py gate --teacher $S/methods/supervised_B_s[0-9]/last.pt --images data/toy/synthetic.txt \
    --device cpu | tee $S/gate_supervised_B.md
  python quality.py gate --teacher $S/methods/sense_s[0-9]/last.pt --images data/toy/synthetic.txt \
    --device cpu | tee $S/gate_sense.md
  # 3: the teachers' labels of each split against the true layouts (one labelled split per teacher seed), then the
  # students, the teacher-labelled ones beside their true-layout controls
  labels=($S/protocol/labels/{sparse_coarse,sparse_fine,dense_coarse,dense_fine}_s[0-9]/labels.txt)
  if [ ${#labels[@]} -gt 0 ]; then python quality.py truth --labels "${labels[@]}" | tee $S/protocol_labels.md; fi
  python eval.py --summarize $S/protocol/{teacher,truth}_{sparse_coarse,sparse_fine,dense_coarse,dense_fine}_s[0-9] \
    --per-class --out $S/protocol.md
  python eval.py --summarize $S/methods/{supervised_B,sense}_s[0-9] \
    $S/ladder/sense_{sparse_coarse,sparse_fine,dense_coarse,dense_fine}_s[0-9] --per-class --out $S/ladder.md
  # 5. the synthetic-scale study (2x is the default synthetic set: the methods section's sense runs)
  python eval.py --summarize $S/methods/supervised_B_s[0-9] $S/scale/sense_x{1,2,4,6}_s[0-9] --per-class --out $S/scale.md
  # 6. Mask2Former, and the γ / image gate of its supervised teachers
  python eval.py --summarize $S/m2f/{supervised_B,supervised_2B,truth,pseudo,sense}_s[0-9] --per-class \
    --keys image_ratio mask_ratio things_gated ot_changed acc_trained --out $S/m2f.md
  python eval.py --summarize $S/m2f/{supervised_B_half,supervised_B,supervised_B_x2}_s[0-9] --per-class --out $S/m2f_schedule.md
  teachers=($S/m2f/supervised_B_s[0-9]/last.pt)
  if [ ${#teachers[@]} -gt 0 ]; then
    python quality.py gate --teacher "${teachers[@]}" --images data/toy/synthetic.txt --device cpu | tee $S/gate_m2f.md
  fi
  # 7. OT on the long-tailed world, and the γ gate of its supervised teachers
  python eval.py --summarize $S/long_tail/{supervised_B,pseudo,soft,sense,sense_image_uniform,plan_gate,pseudo_all}_s[0-9] \
    --per-class --out $S/long_tail.md
  teachers=($S/long_tail/supervised_B_s[0-9]/last.pt)
  if [ ${#teachers[@]} -gt 0 ]; then
    python quality.py gate --teacher "${teachers[@]}" --images data/toy_lt/synthetic.txt --device cpu \
      | tee $S/gate_long_tail.md
  fi
}
SECTION=${1:-all}
case "$SECTION" in
  all | methods | schedule | protocol | ladder | scale | m2f | long_tail | quick) ;;
  summarize) summarize; exit 0 ;;
  *) echo "toy_study.sh: unknown section '$SECTION' (expected methods, schedule, protocol, ladder, scale, m2f, long_tail," \
       "summarize or quick)" >&2
     exit 2 ;;
esac

run_all() {  # reads "folder flags..." lines; skips finished runs (--resume auto continues unfinished ones)
  xargs -P 2 -L 1 bash -c 'out=$0; mkdir -p "$out";
    OMP_NUM_THREADS=1 python train.py --out "$out" --resume auto "$@" >> "$out/train.log" 2>&1 ||
    echo "FAILED: $out (see $out/train.log)"'
}
link() { mkdir -p "$(dirname "$2")"; ln -sfn "$(realpath --relative-to="$(dirname "$2")" "$1")" "$2"; }

python data.py toy --root data/toy                  # the toy world (seconds), if not there yet
python data.py toy --long-tail --root data/toy_lt   # its long-tailed variant (section 7)
python model.py --backbone toy --num-classes 7      # checks the shipped toy backbone (made only if missing)

if [ "$SECTION" = quick ]; then  # for a class: the baseline, the upper bound and SENSE, one seed, with the curves
  for m in truth sense supervised; do echo "$S/quick/${m}_s0 --method $m --seed 0"; done | run_all  # longest first
  python eval.py --plot $S/quick/{supervised,truth,sense}_s0 --out $S/quick/curves.png
  python eval.py --summarize $S/quick/{supervised,truth,sense}_s0 --per-class
  exit 0
fi

# 1. methods, seed by seed (a study cut short has every group at the same number of seeds): the supervised baselines
# (B and 2B real images per step), the controls on the synthetic images' true layouts (every pixel; the pixels the
# teacher's gate passes), the teacher's own labels without OT (hard, soft), SENSE, SENSE gated on the OT plan, and
# its control without OT and without a gate (the teacher's argmax on every pixel)
if [ "$SECTION" = all ] || [ "$SECTION" = methods ]; then
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
fi

# 2. the schedule: the criterion the default is measured against (the smallest step count at which supervised_B gains
# at most 0.5 mIoU from doubling its steps): supervised_B at ½×, 1×, 2× and 4× the default
if [ "$SECTION" = all ] || [ "$SECTION" = schedule ]; then
for s in $SEEDS; do
  link $S/methods/supervised_B_s$s $S/schedule/supervised_B_x1_s$s
  link $S/methods/sense_s$s $S/schedule/sense_x1_s$s
done
for s in $SEEDS; do
  echo "$S/schedule/supervised_B_half_s$s --method supervised --iters $((STEPS / 2)) --seed $s"
  echo "$S/schedule/supervised_B_x2_s$s --method supervised --iters $((2 * STEPS)) --seed $s"
done | run_all
for s in $SEEDS; do echo "$S/schedule/supervised_B_x4_s$s --method supervised --iters $((4 * STEPS)) --seed $s"; done | run_all
fi

# 3. the paper's Section 3 protocol: each seed's supervised_B teacher (trained on the 20 real images) labels every
# image of each synthetic pool once (its argmax with the flip TTA of the run's own teacher, every pixel); a student
# then learns from those 120 labelled synthetic images alone (no real image) and is evaluated on the real val set.
# The controls train on the same images with their true layouts: what each split could give with a perfect teacher.
if [ "$SECTION" = all ] || [ "$SECTION" = protocol ]; then
for s in $SEEDS; do echo "$S/methods/supervised_B_s$s --method supervised --seed $s"; done | run_all  # the teachers
mkdir -p $S/protocol/labels
for kind in $KINDS; do
  python quality.py label --truth --images data/toy/synthetic/$kind --out $S/protocol/labels/${kind}_truth
  for s in $SEEDS; do
    python quality.py label --teacher $S/methods/supervised_B_s$s/last.pt --images data/toy/synthetic/$kind \
      --out $S/protocol/labels/${kind}_s$s --device cpu > $S/protocol/labels/${kind}_s$s.log 2>&1
  done
done
for s in $SEEDS; do
  for kind in $KINDS; do
    echo "$S/protocol/teacher_${kind}_s$s --method supervised --train-split $S/protocol/labels/${kind}_s$s/labels.txt --seed $s"
    echo "$S/protocol/truth_${kind}_s$s --method supervised --train-split $S/protocol/labels/${kind}_truth/labels.txt --seed $s"
  done
done | run_all
fi

# 4. the paper's quality ladder inside the SENSE loop: quality.py scores the whole synthetic pool (480 images; density
# from the seed-0 supervised teacher's components, fidelity from GLCM contrast and compression) and splits it into
# four quarters of 120 at matched sizes; SENSE then runs with each quarter as its synthetic set
if [ "$SECTION" = all ] || [ "$SECTION" = ladder ]; then
python quality.py score --images data/toy/synthetic --teacher $S/methods/supervised_B_s0/last.pt \
  --out $S/ladder/scores.csv --device cpu
python quality.py ladder --scores $S/ladder/scores.csv --out-dir $S/ladder/splits | tee $S/ladder/splits.md
for s in $SEEDS; do
  for rung in $KINDS; do echo "$S/ladder/sense_${rung}_s$s --synthetic $S/ladder/splits/$rung.txt --seed $s"; done
done | run_all
fi
# 5. the synthetic-scale study: SENSE with 1x, 2x (the default, section 1), 4x and 6x as many synthetic images as
# labelled ones (synthetic_x<n>.txt, the dense-fine pool's first n x 20); every run takes the same 1800 steps
if [ "$SECTION" = all ] || [ "$SECTION" = scale ]; then
for s in $SEEDS; do link $S/methods/sense_s$s $S/scale/sense_x2_s$s; done
for s in $SEEDS; do
  for m in 1 6 4; do echo "$S/scale/sense_x${m}_s$s --synthetic data/toy/synthetic_x$m.txt --seed $s"; done
done | run_all
fi

# 6. Mask2Former (the toy head of models.py, 16 queries): the supervised baselines first (its teachers' γ and image
# gates are its precondition P2) and the schedule criterion (supervised_B at ½× and 2× the steps), then the truth
# control (P1), SENSE and the teacher's hard labels without OT
if [ "$SECTION" = all ] || [ "$SECTION" = m2f ]; then
for s in $SEEDS; do
  echo "$S/m2f/supervised_B_s$s --arch mask2former --method supervised --seed $s"
  echo "$S/m2f/supervised_B_half_s$s --arch mask2former --method supervised --iters $((STEPS / 2)) --seed $s"
  echo "$S/m2f/supervised_B_x2_s$s --arch mask2former --method supervised --iters $((2 * STEPS)) --seed $s"
done | run_all
for s in $SEEDS; do
  echo "$S/m2f/sense_s$s --arch mask2former --seed $s"
  echo "$S/m2f/truth_s$s --arch mask2former --method truth --seed $s"
  echo "$S/m2f/pseudo_s$s --arch mask2former --method pseudo --seed $s"
  echo "$S/m2f/supervised_2B_s$s --arch mask2former --method supervised --real-batch 16 --seed $s"
done | run_all
fi

# 7. OT where classes are unequal: the long-tailed world (12 classes, data.py toy --long-tail): the supervised
# baseline (and teacher), SENSE as the reference code runs it (one problem over the batch, the present classes' uniform
# marginal), SENSE as the paper's text says (one problem per image, uniform over all K), the teacher's own labels
# (hard, soft) without OT; then SENSE with the γ gate on the plan (where OT's relabelling is trained on) and its control,
# the teacher's argmax on every pixel
if [ "$SECTION" = all ] || [ "$SECTION" = long_tail ]; then
for s in $SEEDS; do
  echo "$S/long_tail/supervised_B_s$s --dataset toy_lt --method supervised --seed $s"
  echo "$S/long_tail/sense_s$s --dataset toy_lt --seed $s"
  echo "$S/long_tail/pseudo_s$s --dataset toy_lt --method pseudo --seed $s"
  echo "$S/long_tail/sense_image_uniform_s$s --dataset toy_lt --ot-scope image --ot-marginal uniform --seed $s"
  echo "$S/long_tail/soft_s$s --dataset toy_lt --method soft --seed $s"
  echo "$S/long_tail/plan_gate_s$s --dataset toy_lt --ot-gate plan --seed $s"
  echo "$S/long_tail/pseudo_all_s$s --dataset toy_lt --method pseudo --conf-thresh 0 --seed $s"
done | run_all
fi
summarize
