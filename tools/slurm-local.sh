#!/usr/bin/env bash
# A real single-node SLURM on this host, for CI and for trying the cluster path.
#
#   tools/slurm-local.sh up       install Debian's packages if missing, write the config,
#                                 start munged, mariadbd, slurmdbd, slurmctld, slurmd
#                                 (no systemd) and wait until the node is idle. Idempotent.
#   tools/slurm-local.sh down     stop only the daemons this script started (by pid file)
#   tools/slurm-local.sh status   which daemons are up, and sinfo; exit 0 only if all are up
#
# Everything lives under $ISODIFF_SLURM_DIR (default /tmp/isodiff-slurm): config, pid files,
# logs, controller state and the accounting database. `up` on a stopped cluster wipes the
# controller state and the database together, or job ids repeat and sacct returns several
# rows for one id. Accounting (slurmdbd) is required: submitit learns job states only from
# sacct, and without it a job that dies without a result makes job.result() hang forever.
# Needs root (slurmd runs jobs as their user). Written for Debian 12 (Slurm 22.05).
set -euo pipefail

STATE=${ISODIFF_SLURM_DIR:-/tmp/isodiff-slurm}
CLUSTER=isodiff
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)  # start order; stop in reverse
ETC_LINK=/etc/slurm/slurm.conf
CONF=$STATE/etc/slurm.conf

say() { printf '[slurm-local] %s\n' "$*"; }
die() { printf '[slurm-local] ERROR: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# munged runs as user munge and keeps its files in its own directory.
log_of() { if [[ $1 == munged ]]; then echo "$STATE/munge/munged.log"; else echo "$STATE/log/$1.log"; fi; }
pid_of() { if [[ $1 == munged ]]; then echo "$STATE/munge/munged.pid"; else echo "$STATE/run/$1.pid"; fi; }

# Print the tail of a daemon's log to stderr, then fail.
die_log() {
  local name=$1; shift
  local log; log=$(log_of "$name")
  if [[ -s $log ]]; then
    printf '[slurm-local] --- last lines of %s ---\n' "$log" >&2
    tail -n 25 "$log" >&2
    printf '[slurm-local] ---\n' >&2
  fi
  die "$*"
}

# alive NAME: its pid file names a live process called NAME. A stale pid file (after
# kill -9) may name a reused pid, hence the name check; a zombie counts as stopped
# because PID 1 on these machines reaps late.
alive() {
  local f pid state
  f=$(pid_of "$1")
  [[ -s $f ]] || return 1
  pid=$(tr -dc '0-9' <"$f")
  [[ -n $pid && -r /proc/$pid/comm ]] || return 1
  [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$1" ]] || return 1
  state=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1)
  [[ -n $state && $state != Z && $state != X ]]
}

pid_value() { tr -dc '0-9' <"$(pid_of "$1")"; }

# wait_until SECONDS CMD...: poll CMD every 0.1 s.
wait_until() {
  local deadline cmd_rc
  deadline=$(( $(date +%s) + $1 )); shift
  while true; do
    cmd_rc=0; "$@" >/dev/null 2>&1 || cmd_rc=$?
    (( cmd_rc == 0 )) && return 0
    (( $(date +%s) >= deadline )) && return 1
    sleep 0.1
  done
}

stop_one() {
  local name=$1 pid
  if alive "$name"; then
    pid=$(pid_value "$name")
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_until 15 bash -c "! [[ -r /proc/$pid/stat ]] || \
        [[ \$(sed 's/.*) //' /proc/$pid/stat | cut -d' ' -f1) == [ZX] ]]"; then
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.2
    fi
    say "stopped $name (pid $pid)"
  fi
  rm -f "$(pid_of "$name")"
}

# Ports: start from Slurm's defaults, skip any that answer (another Slurm, another copy).
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
next_free_port() {
  local p=$1
  while port_busy "$p" || [[ " ${TAKEN_PORTS:-} " == *" $p "* ]]; do p=$((p + 1)); done
  TAKEN_PORTS="${TAKEN_PORTS:-} $p"
  echo "$p"
}

# ---------------------------------------------------------------------------------------
install_packages() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' \
      || missing+=("$p")
  done
  (( ${#missing[@]} == 0 )) && return 0
  command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get: \
install them with your package manager"
  local t0 log=$STATE/log/apt.log
  t0=$(now)
  say "installing ${missing[*]} (log: $log)"
  # Keep the packages' init scripts from starting system-wide daemons: we run our own.
  local policy=/usr/sbin/policy-rc.d made_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && made_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  local rc=0
  if ! apt-cache show "${missing[@]}" >/dev/null 2>&1; then
    say "apt-get update (package lists lack ${missing[*]})"
    apt-get update -q >>"$log" 2>&1 || rc=$?
  fi
  if (( rc == 0 )); then
    apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$log" 2>&1 || rc=$?
  fi
  (( made_policy )) && rm -f "$policy"
  if (( rc != 0 )); then
    tail -n 25 "$log" >&2
    die "apt-get failed (exit $rc) installing ${missing[*]}; full log: $log"
  fi
  say "installed in $(since "$t0") s"
}

write_config() {
  local host node_line
  host=$(hostname -s)
  # slurmd -C prints this host's NodeName line (CPUs, sockets, cores, RealMemory).
  node_line=$(slurmd -C | head -n 1 | sed 's/ UpTime=.*//')
  [[ $node_line == NodeName=* ]] || die "unexpected output of 'slurmd -C': $node_line"
  node_line=${node_line/NodeName=$host/NodeName=$host NodeAddr=127.0.0.1}

  DB_PORT=$(next_free_port 13306)
  CTLD_PORT=$(next_free_port 6817)
  SLURMD_PORT=$(next_free_port 6818)
  DBD_PORT=$(next_free_port 6819)
  DB_PASS=$(head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n')

  cat >"$CONF" <<EOF
# Written by tools/slurm-local.sh: a single-node cluster on this host.
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$STATE/munge/munge.socket.2
MpiDefault=none
# No cgroups here: track processes by parent pid and bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# For auth/munge this names the munge socket used to reach slurmdbd (AuthInfo is not used).
AccountingStoragePass=$STATE/munge/munge.socket.2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Reject impossible requests at submission, else they pend forever and submitit hangs.
EnforcePartLimits=ALL
# Start jobs as soon as they are submitted (the default batches them every ~3 s).
SchedulerParameters=batch_sched_delay=0
# submitit ignores SIGTERM; the default 30 s would hold the CPUs of a cancelled or
# requeued job (and let it train on meanwhile).
KillWait=2
ReturnToService=2
MailProg=/bin/true
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$(pid_of slurmctld)
SlurmdPidFile=$(pid_of slurmd)
SlurmctldLogFile=$(log_of slurmctld)
SlurmdLogFile=$(log_of slurmd)
$node_line State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

  # slurmdbd finds slurmdbd.conf beside slurm.conf; it must be private to SlurmUser.
  (umask 077; cat >"$STATE/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$STATE/munge/munge.socket.2
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$(pid_of slurmdbd)
LogFile=$(log_of slurmdbd)
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
  )
  printf 'export SLURM_CONF=%s\n' "$CONF" >"$STATE/env.sh"
}

# Client commands (sinfo, sbatch, sacct) read /etc/slurm/slurm.conf unless SLURM_CONF is
# set: link it to our config when that path is free or already ours.
link_config() {
  if [[ -L $ETC_LINK && $(readlink "$ETC_LINK") == "$STATE"/* ]] || [[ ! -e $ETC_LINK ]]; then
    mkdir -p "$(dirname "$ETC_LINK")"
    ln -sfn "$CONF" "$ETC_LINK"
    say "linked $ETC_LINK -> $CONF"
  else
    say "left the existing $ETC_LINK alone: run 'source $STATE/env.sh' to use this cluster"
  fi
}

start_munged() {
  local dir=$STATE/munge
  install -d -o munge -g munge -m 0755 "$dir"
  # A private key: the cluster shares nothing with a system-wide munge.
  runuser -u munge -- mungekey --create --keyfile="$dir/munge.key" >/dev/null 2>&1 \
    || die "mungekey could not create $dir/munge.key"
  rm -f "$(pid_of munged)"
  runuser -u munge -- munged --force --socket="$dir/munge.socket.2" \
    --key-file="$dir/munge.key" --pid-file="$(pid_of munged)" --seed-file="$dir/munged.seed" \
    --log-file="$(log_of munged)" </dev/null 9>&- >>"$STATE/log/munged.out" 2>&1 \
    || die_log munged "munged failed to start"
  wait_until 10 alive munged || die_log munged "munged did not come up"
  wait_until 10 test -S "$dir/munge.socket.2" || die_log munged "munged has no socket"
}

start_mariadbd() {
  local data=$STATE/mysql sql=$STATE/etc/init.sql
  (umask 077; cat >"$sql" <<EOF
CREATE DATABASE slurm_acct_db;
CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
CREATE USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF
  )
  # A throwaway database: small buffers, no binlog, no fsync per commit.
  local opts=(--no-defaults --datadir="$data" --user=root --skip-name-resolve --skip-log-bin
              --innodb-buffer-pool-size=32M --innodb-log-file-size=16M
              --innodb-flush-log-at-trx-commit=0)
  mariadb-install-db "${opts[@]}" --auth-root-authentication-method=socket --skip-test-db \
    >"$(log_of mariadb-install)" 2>&1 || die_log mariadb-install "mariadb-install-db failed"
  rm -f "$(pid_of mariadbd)"
  # mariadbd stays in the foreground: detach it into its own session.
  setsid mariadbd "${opts[@]}" --bind-address=127.0.0.1 --port="$DB_PORT" \
    --socket="$STATE/run/mysql.sock" --pid-file="$(pid_of mariadbd)" \
    --log-error="$(log_of mariadbd)" </dev/null >/dev/null 2>&1 9>&- &
  wait_until 30 alive mariadbd || die_log mariadbd "mariadbd did not come up"
  wait_until 30 port_busy "$DB_PORT" \
    || die_log mariadbd "mariadbd does not listen on 127.0.0.1:$DB_PORT"
  mariadb --no-defaults --socket="$STATE/run/mysql.sock" -u root <"$sql" \
    >>"$(log_of mariadbd)" 2>&1 || die_log mariadbd "could not create the accounting database"
}

# start_slurm NAME: the Slurm daemons fork into the background themselves.
start_slurm() {
  local name=$1
  rm -f "$(pid_of "$name")"
  SLURM_CONF=$CONF "$name" </dev/null 9>&- >>"$(log_of "$name")" 2>&1 \
    || die_log "$name" "$name failed to start"
  wait_until 15 alive "$name" || die_log "$name" "$name did not come up"
}

node_state() { SLURM_CONF=$CONF sinfo -h -N -o '%t' 2>/dev/null | head -n 1; }
# Fail fast (with the log) if a daemon dies while we wait for the node.
node_idle() {
  local d
  for d in slurmdbd slurmctld slurmd; do alive "$d" || return 2; done
  [[ $(node_state) == idle ]]
}
wait_idle() {
  local deadline=$(( $(date +%s) + $1 )) rc d
  while true; do
    rc=0; node_idle || rc=$?
    if (( rc == 2 )); then
      for d in slurmdbd slurmctld slurmd; do alive "$d" || die_log "$d" "$d died during start"; done
    fi
    (( rc == 0 )) && return 0
    (( $(date +%s) >= deadline )) && return 1
    sleep 0.1
  done
}
cluster_registered() {
  SLURM_CONF=$CONF sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER"
}

all_alive() {
  local d
  for d in "${DAEMONS[@]}"; do alive "$d" || return 1; done
}

# Only a directory this script made (or an empty one) is ever wiped.
wipe_state() {
  if [[ -e $STATE ]]; then
    if [[ -e $STATE/.isodiff-slurm ]] || [[ -z $(ls -A "$STATE") ]]; then
      rm -rf "${STATE:?}"
    else
      die "$STATE exists and was not made by this script; set ISODIFF_SLURM_DIR elsewhere"
    fi
  fi
  mkdir -p "$STATE"/{etc,run,log,ctld,slurmd}
  touch "$STATE/.isodiff-slurm"
}

do_down() {
  local i
  if alive slurmctld; then
    # Cancel this cluster's jobs first, so that no job step outlives its slurmd.
    if [[ -n $(SLURM_CONF=$CONF squeue -h -o %A 2>/dev/null) ]]; then
      say "cancelling the jobs still queued or running"
      SLURM_CONF=$CONF scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
      wait_until 15 bash -c "[[ -z \$(SLURM_CONF=$CONF squeue -h -t R,CG -o %A) ]]" || true
    fi
  fi
  for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do stop_one "${DAEMONS[i]}"; done
  if [[ -L $ETC_LINK && $(readlink "$ETC_LINK") == "$STATE"/* ]]; then
    rm -f "$ETC_LINK"
  fi
  say "down"
}

# A failed bring-up stops what it started (the logs stay for reading).
cleanup_failed_up() {
  local rc=$?
  if (( rc != 0 )); then
    say "bring-up failed: stopping the daemons it started (logs kept in $STATE/log)"
    do_down >/dev/null 2>&1 || true
  fi
  return $rc
}

do_up() {
  local t0; t0=$(now)
  [[ $EUID -eq 0 ]] || die "run as root: slurmd must be able to run jobs as their users"
  if [[ -e $STATE/.isodiff-slurm ]] && all_alive && node_state | grep -qE '^(idle|mix|alloc)'; then
    link_config
    say "already up (state dir $STATE)"
    return 0
  fi
  # Anything half-started by an earlier run goes first, then the state with it.
  if [[ -e $STATE/.isodiff-slurm ]]; then
    local d
    for d in "${DAEMONS[@]}"; do
      if alive "$d"; then
        say "not all daemons are up: stopping the rest and starting from scratch"
        break
      fi
    done
    do_down >/dev/null
  fi
  wipe_state
  trap cleanup_failed_up EXIT
  install_packages
  write_config
  say "config: $CONF (ports: slurmctld $CTLD_PORT, slurmd $SLURMD_PORT, slurmdbd $DBD_PORT, \
mariadb $DB_PORT)"
  start_munged;   say "munged up ($(since "$t0") s)"
  start_mariadbd; say "mariadbd up on 127.0.0.1:$DB_PORT ($(since "$t0") s)"
  start_slurm slurmdbd
  wait_until 30 port_busy "$DBD_PORT" || die_log slurmdbd "slurmdbd does not listen on $DBD_PORT"
  say "slurmdbd up ($(since "$t0") s)"
  start_slurm slurmctld; say "slurmctld up ($(since "$t0") s)"
  start_slurm slurmd;    say "slurmd up ($(since "$t0") s)"
  wait_idle 30 \
    || die_log slurmctld "node $(hostname -s) did not become idle (state: '$(node_state)')"
  # slurmctld registers the cluster with slurmdbd on start; jobs need it for sacct.
  wait_until 30 cluster_registered || die_log slurmdbd "cluster $CLUSTER not in accounting"
  link_config
  trap - EXIT
  say "up in $(since "$t0") s: $(SLURM_CONF=$CONF sinfo -h -o '%P %a %D %t %c cpus %m MB')"
}

do_status() {
  local d ok=0
  for d in "${DAEMONS[@]}"; do
    if alive "$d"; then
      printf '  %-10s up   (pid %s)\n' "$d" "$(pid_value "$d")"
    else
      printf '  %-10s down\n' "$d"; ok=1
    fi
  done
  if alive slurmctld; then SLURM_CONF=$CONF sinfo; fi
  return $ok
}

main() {
  local cmd=${1:-}
  case $cmd in
    up|down)
      # One bring-up or tear-down at a time per state dir. Daemons are started with fd 9
      # closed, or they would hold this lock forever.
      mkdir -p "$(dirname "$STATE")"
      exec 9>"$STATE.lock"
      flock -w 120 9 || die "another slurm-local.sh holds $STATE.lock"
      "do_$cmd"
      ;;
    status) do_status ;;
    *) echo "usage: $0 up|down|status   (state dir: \$ISODIFF_SLURM_DIR, default $STATE)" >&2
       exit 2 ;;
  esac
}

main "$@"
