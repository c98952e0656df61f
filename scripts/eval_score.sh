#!/usr/bin/env bash
# SRCC / PLCC (plus KRCC, RMSE, n) of the six published test sets, like the original scripts/eval_score.sh.
#
#   DATA_ROOT=/data/iqa [RESULTS_DIR=results/res_Qscorer_lora_5_1] scripts/eval_score.sh [qscorer eval options]
#
# DATA_ROOT holds the ground-truth metas (<dataset>/metas/test_*.json); RESULTS_DIR holds the prediction files written
# by `qscorer infer` (default: the original's results/res_Qscorer_lora_5_1). The table is printed and written to
# $RESULTS_DIR/results.md, the scatter plots to $RESULTS_DIR/results_plots/. Extra arguments go to `qscorer eval`
# (e.g. --skip-failed, --no-plots).
set -euo pipefail

if [[ -z "${DATA_ROOT:-}" ]]; then
    echo "usage: DATA_ROOT=/path/to/iqa-data [RESULTS_DIR=results/res_Qscorer_lora_5_1] $0 [qscorer eval options]" >&2
    exit 2
fi
RESULTS_DIR="${RESULTS_DIR:-results/res_Qscorer_lora_5_1}"

qscorer eval \
    --pred_paths \
        "$RESULTS_DIR/test_koniq_2k.json" \
        "$RESULTS_DIR/test_spaq_2k.json" \
        "$RESULTS_DIR/test_kadid_2k.json" \
        "$RESULTS_DIR/test_livew_1k.json" \
        "$RESULTS_DIR/test_agiqa_3k.json" \
        "$RESULTS_DIR/test_csiq_866.json" \
    --gt_paths \
        "$DATA_ROOT/koniq/metas/test_koniq_2k.json" \
        "$DATA_ROOT/spaq/metas/test_spaq_2k.json" \
        "$DATA_ROOT/kadid10k/metas/test_kadid_2k.json" \
        "$DATA_ROOT/LIVE-WILD/metas/test_livew_1k.json" \
        "$DATA_ROOT/AGIQA3K/metas/test_agiqa_3k.json" \
        "$DATA_ROOT/csiq/metas/test_csiq_866.json" \
    --out "$RESULTS_DIR/results.md" \
    "$@"
