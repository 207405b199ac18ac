#!/usr/bin/env bash
# CI's SLURM stage: bring up the single-node cluster (tools/slurm-local.sh), run the tests
# marked `slurm` against it, tear it down, exit with pytest's code. A cluster that was
# already up is used and left up (we stop only what we started).
#   tools/ci-slurm.sh [extra pytest args]
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
SCRIPT=tools/slurm-local.sh
PYTEST=${PYTEST:-.venv/bin/pytest}
export ISODIFF_SLURM_DIR=${ISODIFF_SLURM_DIR:-/tmp/isodiff-slurm}
T0=$(date +%s)

if $SCRIPT status >/dev/null 2>&1; then
  echo "[ci-slurm] using the cluster that is already up ($ISODIFF_SLURM_DIR)"
else
  trap '$SCRIPT down || true' EXIT
  $SCRIPT up || { echo "[ci-slurm] ERROR: the local SLURM did not come up" >&2; exit 1; }
fi
# Clients find this cluster even where /etc/slurm/slurm.conf belongs to another one.
export SLURM_CONF=$ISODIFF_SLURM_DIR/etc/slurm.conf
# Here a missing cluster is an error, not a reason to skip.
export ISODIFF_REQUIRE_SLURM=1

# Collect only the files that use the marker: importing the whole suite costs ~10 s here.
mapfile -t FILES < <(grep -l 'mark.slurm' tests/test_*.py)
rc=0
"$PYTEST" -m slurm -q "${FILES[@]}" "$@" || rc=$?
echo "[ci-slurm] pytest exit $rc; $(( $(date +%s) - T0 )) s including bring-up"
exit $rc
