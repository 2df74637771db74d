#!/usr/bin/env bash
# Holds the request path to its instruction budget: counts every case of
# scripts/instructions.budget with scripts/instructions.sh (callgrind, TOLLGATE_BENCH_NO_REFILL=1:
# the request path alone) and fails when a case passes its budget by more than 2% on the rustc
# version that measured the budget. On another rustc version the counts are only reported (a
# compiler's inlining moves them). A change that must cost more updates the budget in the same
# commit (`--update`) and says why in its message.
#
# Usage: scripts/instruction-budget.sh            check every case against the budget
#        scripts/instruction-budget.sh --update   measure every case and write the budget
set -euo pipefail
cd "$(dirname "$0")/.."

# valgrind is a Debian package: installed where it is missing (as root, or through sudo).
if ! command -v valgrind >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq valgrind >&2
fi

budget=scripts/instructions.budget
tolerance=2 # percent
# The cases the budget holds: tollgate's own of benches/profile.rs (the others are the
# baselines it is compared with), at one tenant and at 10,000.
budget_cases="tollgate tollgate_headers tollgate_defaults tollgate_credits tollgate_fleet"
budget_tenants="1 10000"
rustc_now=$(rustc --version)
rustc_then=$(sed -n 's/^# rustc: //p' "$budget")
if [[ ${1:-} == --update ]]; then
  cases=$budget_cases
  tenant_counts=$budget_tenants
else
  cases=$(grep -v '^#' "$budget" | awk 'NF == 3 { print $1 }' | sort -u | tr '\n' ' ')
  tenant_counts=$(grep -v '^#' "$budget" | awk 'NF == 3 { print $2 }' | sort -un | tr '\n' ' ')
fi
counts=$(mktemp)
trap 'rm -f "$counts"' EXIT
for tenants in $tenant_counts; do
  # "tollgate 1: 3270 instructions/request"
  TOLLGATE_BENCH_NO_REFILL=1 scripts/instructions.sh "$tenants" $cases \
    | sed -n 's/^\([a-z_]*\) \([0-9]*\): \([0-9]*\) instructions\/request$/\1 \2 \3/p' >>"$counts"
done

if [[ ${1:-} == --update ]]; then
  {
    sed -n '/^# [^r]/p; /^#$/p' "$budget"
    echo "# rustc: $rustc_now"
    sort -k2,2n -k1,1 "$counts"
  } >"$budget.new"
  mv "$budget.new" "$budget"
  echo "budget written for $rustc_now:"
  cat "$budget"
  exit 0
fi

same=$([[ "$rustc_now" == "$rustc_then" ]] && echo 1 || echo 0)
failed=0
while read -r case tenants allowed; do
  got=$(awk -v c="$case" -v t="$tenants" '$1 == c && $2 == t { print $3 }' "$counts")
  if [[ -z "$got" ]]; then
    echo "$case $tenants: not measured"
    failed=1
    continue
  fi
  limit=$(( allowed + allowed * tolerance / 100 ))
  verdict=ok
  if (( got > limit )); then
    if (( same )); then verdict="OVER BUDGET (more than ${tolerance}% over)"; failed=1; else verdict="over budget (reported only: another rustc)"; fi
  fi
  printf '%-18s %6s tenants: %6s instructions/request, budget %6s: %s\n' "$case" "$tenants" "$got" "$allowed" "$verdict"
done < <(grep -v '^#' "$budget" | awk 'NF == 3')
if (( ! same )); then
  echo "the budget was measured with $rustc_then; this is $rustc_now: counts are reported, not held"
fi
exit $failed
