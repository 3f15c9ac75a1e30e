#!/usr/bin/env bash
# local_cluster.sh - a single-node Slurm cluster on this machine, for the launcher tests and for trying
# `storms launch --cluster slurm` without a real cluster.
#
#   bash launchers/slurm/local_cluster.sh start    install (if missing), configure, start, wait until the node is idle
#   bash launchers/slurm/local_cluster.sh stop     cancel every job, stop the daemons started here (by PID file)
#   bash launchers/slurm/local_cluster.sh status   daemons, node state, queue
#
# Needs root and Debian/Ubuntu packages (slurmctld slurmd slurm-client munge, + slurmdbd mariadb-server for
# accounting). No systemd: the daemons are started directly and tracked by PID files. `start` is idempotent: with
# everything up it is a ~0.3 s no-op; the config is rewritten each time and the daemons restart only if it changed.
#
# Accounting (slurmdbd + MariaDB) is on by default because `sacct` is how the launcher and submitit learn that a
# job died without writing a result (scancel, timeout, a killed dependency): without it they would wait forever.
#
# Deliberately NOT set here: DependencyParameters=kill_invalid_depend. Slurm's default leaves a job whose
# dependency failed PENDING forever; the launcher submits every job with --kill-on-invalid-dep=yes, and the tests
# check that this per-job flag (which works on any cluster) is what cancels Stage II after a failed Stage I.
#
# Environment knobs:
#   STORMS_SLURM_DIR        state, spool, logs, pids (kept between runs: job ids keep increasing) [/var/lib/storms-slurm]
#   STORMS_SLURM_ACCOUNTING 1 = slurmdbd + MariaDB so sacct works [1]
#   STORMS_SLURM_CPUS       CPUs to advertise (more than nproc = oversubscribe) [nproc]
#   STORMS_SLURM_MEM_MB     node RealMemory [total - 1024]
#   STORMS_SLURM_TIMEOUT    seconds to wait for the node to become idle [90]
set -euo pipefail

DIR=${STORMS_SLURM_DIR:-/var/lib/storms-slurm}
ACCOUNTING=${STORMS_SLURM_ACCOUNTING:-1}
HOST=$(hostname -s)
CPUS=${STORMS_SLURM_CPUS:-$(nproc)}
MEM=${STORMS_SLURM_MEM_MB:-$(( $(free -m | awk '/^Mem:/{print $2}') - 1024 ))}
TIMEOUT=${STORMS_SLURM_TIMEOUT:-90}
CONF=/etc/slurm/slurm.conf
DBDCONF=/etc/slurm/slurmdbd.conf

log() { printf '[local_cluster %(%H:%M:%S)T] %s\n' -1 "$*"; }
die() { log "error: $*" >&2; exit 1; }
alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
wait_for() {  # wait_for SECONDS DESCRIPTION CMD...
  local t=$1 desc=$2; shift 2
  for ((i = 0; i < t * 4; i++)); do "$@" >/dev/null 2>&1 && return 0; sleep 0.25; done
  log "timed out waiting for $desc"; return 1
}

install_packages() {
  local pkgs=(slurmctld slurmd slurm-client munge) missing=()
  [[ $ACCOUNTING == 1 ]] && pkgs+=(slurmdbd mariadb-server)
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  command -v apt-get >/dev/null || die "apt-get not found: install ${missing[*]} by hand"
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  echo 'man-db man-db/auto-update boolean false' | debconf-set-selections 2>/dev/null || true  # skip a slow trigger
  apt-get update -qq -o DPkg::Lock::Timeout=300
  # without --no-install-recommends slurm pulls in ~40 packages (hdf5, rrd, ipmi, rocm-smi, ...)
  apt-get install -y -qq -o DPkg::Lock::Timeout=300 --no-install-recommends "${missing[@]}" >/dev/null
}

write_slurm_conf() {  # sets CONF_CHANGED
  local acct
  if [[ $ACCOUNTING == 1 ]]; then
    acct=$'AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=localhost\nAccountingStoragePort=6819'
  else
    acct="AccountingStorageType=accounting_storage/none"
  fi
  local override=""
  (( CPUS > $(nproc) )) && override="SlurmdParameters=config_overrides"
  local new
  new=$(cat <<CONF
# single-node cluster for storms_dist launcher tests, written by launchers/slurm/local_cluster.sh
ClusterName=storms
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# requeued jobs may start again after cred_expire seconds (default 120)
AuthInfo=cred_expire=10
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=${DIR}/state
SlurmdSpoolDir=${DIR}/spool
SlurmctldPidFile=${DIR}/slurmctld.pid
SlurmdPidFile=${DIR}/slurmd.pid
SlurmctldLogFile=${DIR}/log/slurmctld.log
SlurmdLogFile=${DIR}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# plain /proc process tracking, no task binding (portable: no cgroup set-up needed)
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
${acct}
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# without a default every job is given all of the node's memory, and jobs run one at a time
DefMemPerCPU=1024
SchedulerType=sched/backfill
# look at pending jobs every 5 s (defaults 60 s / 30 s): requeued and dependent jobs start quickly
SchedulerParameters=sched_interval=5,bf_interval=5
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
# SIGTERM -> SIGKILL grace: a preempted trainer saves its checkpoint in this window
KillWait=30
Waittime=0
${override}
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
)
  CONF_CHANGED=0
  mkdir -p /etc/slurm
  if [[ ! -f $CONF ]] || [[ "$(cat "$CONF")" != "$new" ]]; then
    printf '%s\n' "$new" > "$CONF"; CONF_CHANGED=1
  fi
}

start_munge() {
  [[ -s /etc/munge/munge.key ]] || mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
  if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "starting munged"
    mkdir -p /run/munge; chown munge:munge /run/munge; chmod 755 /run/munge
    runuser -u munge -- /usr/sbin/munged
    wait_for 10 munged sh -c 'munge -n | unmunge'
  fi
}

start_accounting() {
  [[ $ACCOUNTING == 1 ]] || return 0
  if ! mariadb -e 'select 1' >/dev/null 2>&1; then
    log "starting mariadbd"
    mkdir -p /run/mysqld; chown mysql:root /run/mysqld   # mysql must be able to write its pid file there
    [[ -d /var/lib/mysql/mysql ]] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
    setsid nohup /usr/sbin/mariadbd --user=mysql --skip-networking --innodb-buffer-pool-size=64M \
      --pid-file=/run/mysqld/mysqld.pid >"$DIR/log/mariadb.log" 2>&1 < /dev/null &
    wait_for 60 mariadb mariadb -e 'select 1' || die "mariadbd did not start; see $DIR/log/mariadb.log"
  fi
  # ALTER every time: an old password left by CREATE ... IF NOT EXISTS makes slurmdbd retry forever
  mariadb -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost';
              ALTER USER 'slurm'@'localhost' IDENTIFIED BY 'storms-slurm';
              GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
  local new
  new=$(cat <<CONF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
DebugLevel=info
LogFile=${DIR}/log/slurmdbd.log
PidFile=${DIR}/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=storms-slurm
StorageLoc=slurm_acct_db
CONF
)
  if [[ ! -f $DBDCONF ]] || [[ "$(cat "$DBDCONF")" != "$new" ]]; then
    printf '%s\n' "$new" > "$DBDCONF"
    if alive "$DIR/slurmdbd.pid"; then kill "$(cat "$DIR/slurmdbd.pid")"; sleep 1; fi
  fi
  chmod 600 "$DBDCONF"
  if ! alive "$DIR/slurmdbd.pid"; then
    log "starting slurmdbd"
    /usr/sbin/slurmdbd
  fi
  wait_for 30 slurmdbd bash -c 'exec 3<>/dev/tcp/127.0.0.1/6819' || die "slurmdbd did not listen; see $DIR/log/slurmdbd.log"
  # register the cluster before slurmctld starts (else slurmctld waits for a retry)
  if ! sacctmgr -n -P show cluster format=cluster 2>/dev/null | grep -qx storms; then
    sacctmgr -i add cluster storms >/dev/null
  fi
}

start_slurm() {
  if ((CONF_CHANGED)); then
    for d in slurmd slurmctld; do
      if alive "$DIR/$d.pid"; then
        log "config changed: restarting $d"; kill "$(cat "$DIR/$d.pid")"
        for _ in $(seq 1 40); do alive "$DIR/$d.pid" || break; sleep 0.25; done
      fi
    done
  fi
  if ! alive "$DIR/slurmctld.pid"; then log "starting slurmctld"; /usr/sbin/slurmctld; fi
  wait_for 30 slurmctld scontrol ping || die "slurmctld did not answer; see $DIR/log/slurmctld.log"
  if ! alive "$DIR/slurmd.pid"; then log "starting slurmd"; /usr/sbin/slurmd; fi
}

node_state() { sinfo -h -n "$HOST" -o '%T' 2>/dev/null | head -1; }

wait_idle() {
  local st
  for ((i = 0; i < TIMEOUT * 4; i++)); do
    st=$(node_state)
    case $st in
      idle|mixed|allocated|completing) return 0 ;;
      down*|drain*|fail*) scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 0.25
  done
  log "node $HOST not ready (state '$(node_state)'); logs in $DIR/log" >&2
  tail -n 20 "$DIR"/log/slurm*.log >&2 || true
  return 1
}

cmd_start() {
  [[ $(id -u) == 0 ]] || die "must run as root (apt-get, /etc/slurm, daemons)"
  # jobs rendezvous at MASTER_ADDR = the node's name (SLURM_JOB_NODELIST): it must resolve
  if ! getent hosts "$HOST" >/dev/null; then
    log "hostname $HOST does not resolve: adding '127.0.0.1 $HOST' to /etc/hosts"
    echo "127.0.0.1 $HOST" >> /etc/hosts
  fi
  install_packages
  mkdir -p "$DIR"/{state,spool,log}
  write_slurm_conf   # before any client command: without slurm.conf every client dies (configless lookup)
  start_munge
  start_accounting
  start_slurm
  wait_idle
  log "ready: slurm $(dpkg-query -W -f='${Version}' slurmctld), node $HOST $(node_state) (CPUs=$CPUS RealMemory=${MEM}M accounting=$ACCOUNTING)"
}

stop_pid() {  # stop_pid NAME PIDFILE
  local f=$2 pid
  [[ -s $f ]] || return 0
  pid=$(cat "$f")
  kill -0 "$pid" 2>/dev/null || { rm -f "$f"; return 0; }
  log "stopping $1 ($pid)"; kill "$pid"
  for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.25; done
  log "$1 did not exit: SIGKILL"; kill -9 "$pid" 2>/dev/null; rm -f "$f"
}

cmd_stop() {
  if alive "$DIR/slurmctld.pid"; then
    local jobs
    jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
    if [[ -n ${jobs// } ]]; then
      log "cancelling jobs: $jobs"; scancel $jobs 2>/dev/null || true
      for _ in $(seq 1 60); do [[ -z $(squeue -h 2>/dev/null) ]] && break; sleep 0.5; done
    fi
  fi
  stop_pid slurmd "$DIR/slurmd.pid"
  stop_pid slurmctld "$DIR/slurmctld.pid"
  stop_pid slurmdbd "$DIR/slurmdbd.pid"
  stop_pid mariadbd /run/mysqld/mysqld.pid
  stop_pid munged /run/munge/munged.pid
  log "stopped"
}

cmd_status() {
  local rc=0
  for d in slurmctld slurmd slurmdbd; do
    if alive "$DIR/$d.pid"; then echo "$d: running (pid $(cat "$DIR/$d.pid"))"; else echo "$d: stopped"; rc=1; fi
  done
  if scontrol ping >/dev/null 2>&1; then sinfo; squeue; else echo "slurmctld does not answer"; rc=1; fi
  return $rc
}

case ${1:-} in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
