#!/usr/bin/env bash
# Holds the request path to its instruction budget, stated as its goal is: each tollgate case's
# added instructions per request (its count minus the bare service's) as a ratio to
# tower_governor's added (tower_governor_headers' for the case with headers), every case counted
# in one build by scripts/instructions.sh (callgrind, TOLLGATE_BENCH_NO_REFILL=1: the request
# path alone). A compiler that moves both sides moves the ratio little; a change that moves only
# tollgate moves it. Fails when a case's ratio passes its budget by more than its tolerance (2%,
# or the budget line's fourth column), or when a case was not measured; the absolute counts are
# printed beside the ratios. It checks on any compiler: the budget's rustc line is a note, and
# the check never exits 0 without having checked every case.
#
# A change that must cost more updates the budget in the same commit (`--update`) and says why.
#
# Usage: scripts/instruction-budget.sh              check every case against the budget
#        scripts/instruction-budget.sh --update     measure every case and write the budget
#        scripts/instruction-budget.sh --self-test  check, then show that the check fails on a
#                                                   planted slowdown of 3% of the request path's
#                                                   added instructions, and that a budget written
#                                                   by another rustc is still checked
# TOLLGATE_BUDGET_FILE names another budget file (the self-test's).
set -euo pipefail
cd "$(dirname "$0")/.."

# valgrind is a Debian package: installed where it is missing (as root, or through sudo).
if ! command -v valgrind >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq valgrind >&2
fi

mode=${1:-check}
budget=${TOLLGATE_BUDGET_FILE:-scripts/instructions.budget}
tolerance=2 # percent, unless a budget line says
# The cases the budget holds (tollgate's own of benches/profile.rs) and the baselines their
# ratios are taken against, at one tenant and at 10,000.
budget_cases="tollgate tollgate_headers tollgate_defaults tollgate_credits tollgate_fleet"
baselines="bare tower_governor tower_governor_headers"
budget_tenants="1 10000"
# Every case at every tenant count is measured and must have its line in the budget: a line
# taken out of the file is a failure, not a case left unchecked.
cases=$budget_cases
tenant_counts=$budget_tenants
counts=$(mktemp)
trap 'rm -f "$counts"' EXIT
# "tollgate 1: 3270 instructions/request" → "tollgate 1 3270"
count_cases() {
  TOLLGATE_BENCH_NO_REFILL=1 scripts/instructions.sh "$@" \
    | sed -n 's/^\([a-z_]*\) \([0-9]*\): \([0-9]*\) instructions\/request$/\1 \2 \3/p'
}
for tenants in $tenant_counts; do
  # shellcheck disable=SC2086
  count_cases "$tenants" $baselines $cases >>"$counts"
done

# The ratio of a case's added instructions to its baseline's, from a counts file.
ratio_of() { # counts case tenants
  awk -v c="$2" -v t="$3" '
    $2 == t { n[$1] = $3 }
    END {
      base = (c == "tollgate_headers") ? "tower_governor_headers" : "tower_governor"
      if (!(c in n) || !("bare" in n) || !(base in n) || n[base] <= n["bare"] || n[c] <= n["bare"]) { print ""; exit }
      printf "%.4f %d %d %d %s\n", (n[c] - n["bare"]) / (n[base] - n["bare"]), n[c], n["bare"], n[base], base
    }' "$1"
}

if [[ $mode == --update ]]; then
  {
    grep '^#' "$budget" | grep -v '^# rustc: '
    echo "# rustc: $(rustc --version) (a note: the ratios are checked on any compiler)"
    for tenants in $budget_tenants; do
      for c in $budget_cases; do
        read -r r _ <<<"$(ratio_of "$counts" "$c" "$tenants")"
        [[ -n "$r" ]] || { echo "$c $tenants was not measured: no budget written" >&2; exit 1; }
        # A tolerance of its own, kept.
        own=$(awk -v c="$c" -v t="$tenants" '$1 == c && $2 == t && NF >= 4 { print $4 }' "$budget")
        echo "$c $tenants $(printf '%.3f' "$r")${own:+ $own}"
      done
    done
  } >"$budget.new"
  mv "$budget.new" "$budget"
  echo "budget written:"
  cat "$budget"
  echo "counts (instructions per request):"
  cat "$counts"
  exit 0
fi

# Checks the counts in $1 against the budget in $2; prints a line per case; returns 1 when a
# case is over its budget or was not measured.
check() { # counts budget
  local failed=0 checked=0 case tenants allowed tol got added got_c bare base_c base
  while read -r case tenants allowed tol; do
    checked=$((checked + 1))
    tol=${tol:-$tolerance}
    # A line's own tolerance is for a case whose count spreads between runs, not a way out.
    if ! [[ $tol =~ ^[0-9]+$ ]] || (( tol > 5 )); then
      echo "$case $tenants: a tolerance of '$tol'%: at most 5"
      failed=1
      continue
    fi
    read -r got got_c bare base_c base <<<"$(ratio_of "$1" "$case" "$tenants")"
    if [[ -z "$got" ]]; then
      echo "$case $tenants: not measured"
      failed=1
      continue
    fi
    added=$((got_c - bare))
    verdict=$(awk -v g="$got" -v a="$allowed" -v t="$tol" 'BEGIN {
      over = (g / a - 1) * 100
      if (g > a * (1 + t / 100)) printf "OVER BUDGET (%+.1f%%, more than %s%% over)", over, t
      else if (g < a * (1 - t / 100)) printf "ok (%+.1f%%; SLACK: more than %s%% under, write the budget anew with --update so that it holds this build)", over, t
      else printf "ok (%+.1f%%)", over }')
    [[ $verdict == ok* ]] || failed=1
    printf '%-18s %6s tenants: ratio %6.3f (budget %6.3f): %s; %5d instructions/request, %d added, %s %d, bare %d\n' \
      "$case" "$tenants" "$got" "$allowed" "$verdict" "$got_c" "$added" "$base" "$base_c" "$bare"
  done < <(grep -v '^#' "$2" | awk 'NF >= 3')
  if (( checked == 0 )); then
    echo "no case in $2: nothing was checked"
    return 1
  fi
  # With the whole budget (not the self-test's one line): every case has its line.
  if [[ "${3:-}" == whole ]]; then
    local c t
    for t in $budget_tenants; do
      for c in $budget_cases; do
        if ! grep -v '^#' "$2" | awk -v c="$c" -v t="$t" '$1 == c && $2 == t && NF >= 3 { found = 1 } END { exit !found }'; then
          echo "$c $t: no line in $2 (every case is held; write the budget with --update)"
          failed=1
        fi
      done
    done
  fi
  return $failed
}

echo "compiler: $(rustc --version); budget's: $(sed -n 's/^# rustc: //p' "$budget")"
status=0
check "$counts" "$budget" whole || status=1
if [[ $mode != --self-test ]]; then
  exit $status
fi
if (( status )); then
  echo "self-test: the build itself is over budget; the planted slowdown is not tried"
  exit 1
fi

echo
echo "== self-test: the check holds on another compiler's budget"
other=$(mktemp)
trap 'rm -f "$counts" "$other"' EXIT
sed 's/^# rustc: .*/# rustc: rustc 0.0.0 (another compiler)/' "$budget" >"$other"
# The same counts under a budget tightened by 10%, written by "another" rustc: it must fail.
awk '/^#/ { print; next } NF >= 3 { $3 = sprintf("%.3f", $3 * 0.9) } { print }' "$other" >"$other.tight"
mv "$other.tight" "$other"
if check "$counts" "$other" >/dev/null; then
  echo "self-test FAILED: a budget of another rustc, 10% under this build, was not held"
  exit 1
fi
echo "a budget written by another rustc and 10% under this build: refused, as it must be"

echo
echo "== self-test: a planted slowdown of 3% of tollgate's added instructions fails the check"
# The plant: the tollgate cases' inner service spins TOLLGATE_BENCH_PLANT iterations of a loop
# per request (benches/support/mod.rs), which the check sees as tollgate's own instructions.
read -r _ got_c bare _ <<<"$(ratio_of "$counts" tollgate 1)"
added=$((got_c - bare))
want=$(( (added * 3 + 99) / 100 ))
per=4
for _ in 1 2; do
  iterations=$(( (want + per - 1) / per ))
  planted=$(mktemp)
  grep -v '^tollgate ' "$counts" >"$planted"
  TOLLGATE_BENCH_PLANT=$iterations count_cases 1 tollgate >>"$planted"
  read -r _ planted_c _ <<<"$(ratio_of "$planted" tollgate 1)"
  more=$((planted_c - got_c))
  # The loop's cost per iteration is the compiler's: measured, and the plant sized again once.
  if (( more * 100 >= added * 5 / 2 && more * 1000 <= added * 35 )); then break; fi
  per=$(( more / iterations )); (( per > 0 )) || per=1
done
pct=$(awk -v m="$more" -v a="$added" 'BEGIN { printf "%.2f", m * 100 / a }')
echo "planted: $iterations iterations, +$more instructions per request on $added added (+$pct%)"
if (( more * 1000 > added * 35 )); then
  echo "self-test FAILED: the plant added more than 3.5% ($pct%): it shows nothing of a 3% slowdown"
  exit 1
fi
# Against a budget of this build's own ratio (not the file's, which a cheaper build sits under):
# the check's sensitivity, not the budget's slack.
read -r own _ <<<"$(ratio_of "$counts" tollgate 1)"
if check "$planted" <(echo "tollgate 1 $own"); then
  echo "self-test FAILED: a slowdown of $pct% passed a budget of this build's ratio ($own)"
  exit 1
fi
rm -f "$planted"
echo "refused, as it must be: a slowdown of ${tolerance}% beyond a budget line fails the check (the budget file's lines are this build's, or it says SLACK above)"
exit 0
