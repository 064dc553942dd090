#!/usr/bin/env bash
# A real two-node SLURM cluster on this one machine, from Debian's packages (slurm-wlm, munge):
# slurmctld, two slurmd (n1, n2: one CPU each, both at 127.0.0.1) and munged, with requeue and
# partition-priority preemption. Root only. The tests start it once per session (tests/test_slurm.py)
# and stop it after; anyone can start it by hand (docs/testing.md):
#
#   bash tests/slurm/cluster.sh start /tmp/scbch-slurm     # prints the SLURM_CONF line to export
#   export SLURM_CONF=/tmp/scbch-slurm/slurm.conf; sinfo
#   bash tests/slurm/cluster.sh stop /tmp/scbch-slurm
#
# Partitions: `cpu` (default) and `high`, which preempts `cpu` (PreemptMode=REQUEUE, 20 s of grace
# after SIGTERM). Installing: `bash tests/slurm/cluster.sh install` (apt-get).
set -euo pipefail
cmd=${1:?usage: cluster.sh install|start DIR|stop DIR}
dir=${2:-/tmp/scbch-slurm}

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then return 0; fi
  [ "$(id -u)" = 0 ] || { echo "cluster.sh: installing slurm-wlm and munge needs root" >&2; return 1; }
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null
}

start() {
  [ "$(id -u)" = 0 ] || { echo "cluster.sh: the cluster runs as root" >&2; return 1; }
  stop 2>/dev/null || true
  rm -rf "$dir"/state "$dir"/spool
  mkdir -p "$dir"/{state,log,munge,run} "$dir"/spool/{n1,n2}
  # the node names must resolve (slurmd -N looks its own name up)
  grep -qE '^127\.0\.0\.1[[:space:]].*\bn1\b' /etc/hosts || echo "127.0.0.1 n1 n2" >> /etc/hosts
  [ -s /etc/munge/munge.key ] || { mungekey --create --keyfile /etc/munge/munge.key 2>/dev/null \
    || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
  chmod 400 /etc/munge/munge.key
  munged --force --socket "$dir/munge/munge.socket" --pid-file "$dir/munge/munged.pid" \
         --log-file "$dir/log/munged.log" --seed-file "$dir/munge/seed"
  cat > "$dir/slurm.conf" <<CONF
ClusterName=scbch
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=16817
SlurmdPort=17001
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/log/jobcomp.log
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_min_interval=100000
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=1
SlurmdTimeout=10
MessageTimeout=10
KillWait=20
MinJobAge=600
JobRequeue=1
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
MpiDefault=none
NodeName=n[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port=17001-17002 CPUs=1 RealMemory=4000 State=UNKNOWN
PartitionName=cpu Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=20
PartitionName=high Nodes=n[1-2] MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
CONF
  export SLURM_CONF="$dir/slurm.conf"
  slurmctld -f "$SLURM_CONF" -i
  slurmd -f "$SLURM_CONF" -N n1
  slurmd -f "$SLURM_CONF" -N n2
  for _ in $(seq 60); do
    if [ "$(sinfo -h -N -p cpu -o '%T' 2>/dev/null | grep -c '^idle')" = 2 ]; then
      echo "export SLURM_CONF=$SLURM_CONF"; return 0
    fi
    sleep 0.5
  done
  echo "cluster.sh: the nodes did not come up; see $dir/log" >&2
  sinfo -N >&2 || true
  return 1
}

stop() {
  for f in "$dir"/run/*.pid "$dir"/munge/munged.pid; do
    [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
  done
  sleep 1
  for f in "$dir"/run/*.pid "$dir"/munge/munged.pid; do
    [ -f "$f" ] && kill -9 "$(cat "$f")" 2>/dev/null || true
    rm -f "$f"
  done
  # a job's step daemons and processes outlive slurmd: end those of this cluster (its SLURM_CONF in their
  # environment, and a job id, or the step daemon's name), so no run of a stopped cluster writes on
  for pid in $(pgrep . 2>/dev/null); do
    env_file=/proc/$pid/environ
    grep -qsz "^SLURM_CONF=$dir/slurm.conf$" "$env_file" || continue
    if grep -qsz '^SLURM_JOB_ID=' "$env_file" || [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = slurmstepd ]; then
      kill -9 "$pid" 2>/dev/null || true
    fi
  done
}

case "$cmd" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  *) echo "usage: cluster.sh install|start DIR|stop DIR" >&2; exit 2 ;;
esac
